"""Several processes: DistributedDataParallel on 2 gloo processes launched by torchrun gives the
update of one process on the same tuples; mining is split across the ranks; a full run works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pylandmark.data import SfM120k, make_sfm_dataset
from pylandmark.extraction import extract
from pylandmark.models import LandmarkNet
from pylandmark.nn.losses import ContrastiveLoss
from pylandmark.training.loop import train_step

TINY = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}

WORKER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from pylandmark import distributed as du
    from pylandmark.data import SfM120k
    from pylandmark.nn.losses import ContrastiveLoss
    from pylandmark.extraction import extract_shared
    from pylandmark.training.mining import mine_tuples
    from pylandmark.models import LandmarkNet
    from pylandmark.training.loop import _GroupForward, train_step

    out, data_root = sys.argv[1], sys.argv[2]
    du.init_from_env("cpu")
    rank, world = du.rank(), du.world_size()
    assert world == 2

    # the same model and tuples on every rank; tuple j goes to rank j % 2
    torch.manual_seed(0)
    tiny = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (56, 40), (48, 48)]
    tuples = [[torch.tensor(rng.normal(size=(3, *shapes[(t + i) % 3])), dtype=torch.float64) for i in range(4)]
              for t in range(4)]
    results = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)
        model = LandmarkNet("cspdarknet53-gem", **tiny).double()
        ddp = nn.parallel.DistributedDataParallel(_GroupForward(model), broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        mine = tuples[rank::2]
        micro = [mine] if accumulation == 1 else [[t] for t in mine]
        loss = train_step(ddp, opt, micro, ContrastiveLoss(0.7), world_size=world)
        total = du.all_reduce_sum([loss])[0]
        results[accumulation] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, total)

    # --loss arcface: the head inside the DDP module, one image per "tuple", image j on rank j % 2
    from pylandmark.nn.losses import ArcFaceHead
    images = [t[0] for t in tuples] + [t[1] for t in tuples]
    classes = [0, 1, 2, 0, 1, 2, 0, 1]
    torch.manual_seed(0)
    model = LandmarkNet("cspdarknet53-gem", **tiny).double()
    head = ArcFaceHead(model.dim, 3, scale=8.0, margin=0.3).double()
    ddp = nn.parallel.DistributedDataParallel(_GroupForward(model, head), broadcast_buffers=False)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.5)
    loss = train_step(ddp, opt, [[[x] for x in images[rank::2]]], None, world_size=world,
                      labels=[classes[rank::2]])
    results["arcface"] = ({**{k: v.detach().clone() for k, v in model.state_dict().items()},
                           "head.weight": head.weight.detach().clone()}, du.all_reduce_sum([loss])[0])

    # uneven all-gather
    x = torch.arange(6, dtype=torch.float16).reshape(3, 2) + 10 * rank
    x = x[: 3 - 2 * rank]
    gathered = du.all_gather_rows(x, [3, 1])

    # split description and mining
    ds = SfM120k(data_root, "train")
    torch.manual_seed(1)
    net = LandmarkNet("cspdarknet53-gem", **tiny)
    desc = extract_shared(net, ds.images, image_size=40, batch_size=4, progress=False, output="torch")
    tuples_mined = mine_tuples(net, ds, query_size=10, pool_size=25, negatives=3, image_size=40,
                               rng=np.random.default_rng(3), batch_size=4, progress=False)
    torch.save({"results": results, "gathered": gathered, "desc": desc,
                "nidxs": torch.from_numpy(tuples_mined.nidxs), "qidxs": torch.from_numpy(tuples_mined.qidxs)},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
''')


def _torchrun(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_sfm_dataset(tmp_path_factory.mktemp("sfm"), n_clusters=8, images_per_cluster=4, image_size=48,
                            seed=21, val_clusters=2)


def test_ddp_update_equals_one_process(tmp_path, data_root):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _torchrun([str(script), str(tmp_path), str(data_root)], tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")

    # one process on all 4 tuples (same seeds as the workers)
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (56, 40), (48, 48)]
    tuples = [[torch.tensor(rng.normal(size=(3, *shapes[(t + i) % 3])), dtype=torch.float64) for i in range(4)]
              for t in range(4)]
    torch.manual_seed(0)
    model = LandmarkNet("cspdarknet53-gem", **TINY).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = train_step(model, opt, [tuples], ContrastiveLoss(0.7))
    for accumulation in (1, 2):
        state0, loss0 = r0["results"][accumulation]
        state1, loss1 = r1["results"][accumulation]
        assert loss0 == pytest.approx(loss, rel=1e-12) and loss1 == pytest.approx(loss, rel=1e-12)
        for k, v in model.state_dict().items():
            assert torch.equal(state0[k], state1[k]), k  # the ranks stay in sync
            assert (state0[k] - v).abs().max().item() < 1e-10, k
        assert not torch.equal(state0["pool.p"], torch.full((1,), 3.0, dtype=torch.float64))

    # arcface: the same update as one process on all 8 images, the head's gradients summed too
    from pylandmark.nn.losses import ArcFaceHead

    images = [t[0] for t in tuples] + [t[1] for t in tuples]
    torch.manual_seed(0)
    model = LandmarkNet("cspdarknet53-gem", **TINY).double()
    head = ArcFaceHead(model.dim, 3, scale=8.0, margin=0.3).double()
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.5)
    initial = head.weight.detach().clone()
    loss = train_step(model, opt, [[[x] for x in images]], None, labels=[[0, 1, 2, 0, 1, 2, 0, 1]], head=head)
    reference = {**model.state_dict(), "head.weight": head.weight.detach()}
    for r in (r0, r1):
        state, total = r["results"]["arcface"]
        assert total == pytest.approx(loss, rel=1e-12)
        for k, v in reference.items():  # float64 sums in another order: far below 1e-10
            assert (state[k] - v).abs().max().item() < 1e-10, k
    assert not torch.equal(reference["head.weight"], initial)  # the head trained

    expected = torch.cat([torch.arange(6, dtype=torch.float16).reshape(3, 2),
                          torch.arange(6, dtype=torch.float16).reshape(3, 2)[:1] + 10])
    assert torch.equal(r0["gathered"], expected) and torch.equal(r1["gathered"], expected)

    # description split across ranks = one process describing everything, up to float16 rounding:
    # the ranks run one thread and other batches, this process more threads, so float32 sums run
    # in other orders; each element within one float16 ulp (plus F32_ROW, see test_extraction)
    from test_extraction import assert_float16_agree

    torch.manual_seed(1)
    net = LandmarkNet("cspdarknet53-gem", **TINY)
    ds = SfM120k(data_root, "train")
    ref = extract(net, ds.images, image_size=40, batch_size=4, progress=False)
    assert r0["desc"].dtype == torch.float16 and r0["desc"].shape == ref.shape
    assert_float16_agree(r0["desc"].numpy(), ref)
    assert torch.equal(r0["desc"], r1["desc"])
    # every rank mined the same tuples, by the cluster rule
    assert torch.equal(r0["nidxs"], r1["nidxs"]) and torch.equal(r0["qidxs"], r1["qidxs"])
    for q, negs in zip(r0["qidxs"].numpy(), r0["nidxs"].numpy()):
        cl = ds.clusters[negs]
        assert ds.clusters[q] not in cl and len(set(cl.tolist())) == 3


def test_torchrun_training(tmp_path, data_root):
    out = tmp_path / "run"
    proc = _torchrun(["-m", "pylandmark.training", "--data-root", str(data_root), "--out", str(out),
                      "--preset", "test", "--epochs", "2", "--image-size", "40", "--query-size", "10",
                      "--pool-size", "24", "--negatives", "2", "--batch-size", "4", "--accumulation", "2",
                      "--validate-every", "1", "--no-progress"], tmp_path)
    assert f"trained network: {out / 'model_best'}" in proc.stdout
    hist = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 10 tuples in steps of 4 over 2 processes x 2 micro-batches: 2 full steps, 8 tuples
    assert [h["n_tuples"] for h in hist] == [8, 8]
    assert all(np.isfinite(h["loss"]) and "val_map" in h for h in hist)
    meta = json.loads((out / "config.json").read_text())
    assert meta["accumulation"] == 2
    net = LandmarkNet.from_pretrained(out / "model_best")
    assert net.dim == 96 and net.whiten is not None  # the test preset: 96 channels, whitening layer
    from pylandmark.training.checkpoint import load_checkpoint

    _, m = load_checkpoint(out / "checkpoints" / "last.pt")
    assert m["world_size"] == 2 and m["epoch"] == 2
