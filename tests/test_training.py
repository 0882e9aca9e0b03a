"""The training loop: recipe defaults, optimiser groups, frozen BatchNorm, the batched step against
a per-image reference, checkpoints and exact resumption, whitening export, validation, the CLI,
and a short run that has to learn."""
from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from pylandmark.data import SfM120k, make_revisited_dataset, make_sfm_dataset
from pylandmark.models import LandmarkNet
from pylandmark.models.whitening import strip_whitening
from pylandmark.nn.losses import ContrastiveLoss
from pylandmark.nn.whiten import Whitening, apply_whitening
from pylandmark.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pylandmark.training.cli import add_arguments, run
from pylandmark.training.config import TRAIN_PRESETS, TrainConfig
from pylandmark.training.loop import build_model, build_optimizer, freeze_batchnorm, train, train_step
from pylandmark.training.validation import validate

TINY = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return make_sfm_dataset(tmp_path_factory.mktemp("sfm"), n_clusters=10, images_per_cluster=5, image_size=64,
                            seed=11, val_clusters=3)


def _small_cfg(root, out, **kw):
    base = dict(data_root=str(root), out_dir=str(out), model="cspdarknet53-gem", model_args=TINY, image_size=48,
                query_size=12, pool_size=30,
                negatives=3, batch_size=4, epochs=2, val_image_size=48, whiten_image_size=48, test_image_size=48,
                mining_batch_size=16)
    base.update(kw)
    return TrainConfig.from_preset("test", **base)


# ----------------------------------------------------------------------------- configuration


def test_defaults_are_the_reference_recipe():
    c = TrainConfig()
    assert (c.image_size, c.query_size, c.pool_size, c.negatives) == (362, 2000, 20000, 5)
    assert (c.loss, c.margin, c.lr, c.weight_decay, c.p_lr_mult) == ("contrastive", 0.85, 5e-7, 1e-6, 10.0)
    assert (c.lr_decay, c.epochs, c.batch_size) == (0.01, 100, 5)
    assert c.model == "cspdarknet53-gem" and c.whitening is None
    r = TRAIN_PRESETS["resnet101-gem"]
    assert r.model == "resnet101-gem" and r.margin == 0.85 and r.lr == 5e-7
    assert TRAIN_PRESETS["cspdarknet53-gem"].model == "cspdarknet53-gem"
    assert TrainConfig.from_dict(json.loads(json.dumps(r.to_dict()))) == r


@pytest.mark.parametrize("kw, match", [
    ({"loss": "hinge"}, "loss"), ({"batch_size": 5, "accumulation": 2}, "accumulation"),
    ({"amp": "fp8"}, "amp"), ({"lr": 0}, "lr"), ({"negatives": 0}, "negatives"), ({"device": "tpu"}, "device"),
    ({"whitening": "zca"}, "whitening"), ({"model": "vgg16"}, "model"), ({"margin": -1}, "margin"),
    ({"image_size": 36.5}, "image_size"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
    with pytest.raises(TypeError, match="model_args"):
        TrainConfig(model_args=[1])
    with pytest.raises(ValueError, match="preset"):
        TrainConfig.from_preset("nope")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_optimizer_groups_and_decay():
    cfg = TrainConfig(model_args=TINY, lr=2e-3, weight_decay=1e-4, lr_decay=0.01)
    model = build_model(cfg)
    opt, sched = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam)
    net, p = opt.param_groups
    assert net["lr"] == 2e-3 and net["weight_decay"] == 1e-4
    assert p["lr"] == pytest.approx(2e-2) and p["weight_decay"] == 0.0 and p["params"] == [model.pool.p]
    assert len(net["params"]) == len(list(model.parameters())) - 1
    for _ in range(3):
        opt.step()  # no gradients: nothing moves
        sched.step()
    assert net["lr"] == pytest.approx(2e-3 * math.exp(-0.03), rel=1e-12)
    assert p["lr"] == pytest.approx(2e-2 * math.exp(-0.03), rel=1e-12)


# ----------------------------------------------------------------------------- one step


def _images(rng, shapes):
    return [torch.tensor(rng.normal(size=(3, h, w)), dtype=torch.float32) for h, w in shapes]


def _reference_loss(model, tuples, margin):
    """Every image forwarded on its own, the contrastive loss written out pair by pair."""
    total = 0.0
    for t in tuples:
        d = [model(x.unsqueeze(0))[0] for x in t]
        total = total + 0.5 * (d[0] - d[1]).pow(2).sum()
        for n in d[2:]:
            dist = (d[0] - n).pow(2).sum().sqrt()
            total = total + 0.5 * torch.clamp(margin - dist, min=0) ** 2
    return total


def test_batched_step_equals_per_image_reference(rng):
    # float64 throughout: the contrastive gradients subtract nearly equal descriptors, so float32
    # rounding differences between batched and single-image convolutions would show at ~1e-3
    torch.manual_seed(1)
    model = LandmarkNet("cspdarknet53-gem", **TINY).double()
    # 3 tuples of different sizes; some images share a shape (and get batched), one tuple has 1 negative
    shapes = [[(40, 56), (56, 40), (40, 56), (48, 48)], [(48, 48), (40, 56), (40, 56), (56, 40)],
              [(56, 40), (56, 40), (40, 56)]]
    tuples = [[x.double() for x in _images(rng, s)] for s in shapes]
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.train()
        freeze_batchnorm(m)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    loss = train_step(model, opt, [tuples], ContrastiveLoss(0.7))
    ref_opt.zero_grad()
    ref_loss = _reference_loss(ref, tuples, 0.7)
    ref_loss.backward()
    ref_opt.step()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a - b).abs().max().item() < 1e-10, name
    assert model.pool.p.item() != 3.0  # p was trained too
    # frozen statistics: running mean / var untouched, affine parameters trained
    for k, v in model.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), k
    assert not torch.equal(model.backbone.stem.conv1.bn.weight, torch.ones_like(model.backbone.stem.conv1.bn.weight))


def test_accumulation_gives_the_same_step(rng):
    torch.manual_seed(2)
    model = LandmarkNet("cspdarknet53-gem", **TINY).double()
    tuples = [[x.double() for x in _images(rng, [(48, 40)] * 4)] for _ in range(4)]
    freeze_batchnorm(model.train())  # as in training: with batch statistics the split would matter
    other = copy.deepcopy(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.3)
    opt_b = torch.optim.SGD(other.parameters(), lr=0.3)
    la = train_step(model, opt_a, [tuples], ContrastiveLoss(0.7))
    lb = train_step(other, opt_b, [tuples[:2], tuples[2:]], ContrastiveLoss(0.7))
    assert la == pytest.approx(lb, rel=1e-12)
    for a, b in zip(model.parameters(), other.parameters()):
        assert (a - b).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------- checkpoints


def test_rng_state_roundtrip():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.rand(3), np.random.rand(2), random.random()
    state = rng_state()
    a = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(state)
    b = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]
    with pytest.raises(ValueError, match="rng_state"):
        set_rng_state({"torch": torch.get_rng_state()})


class _Payload:
    pass


def test_checkpoint_is_atomic_and_tensors_only(tmp_path, monkeypatch):
    path = tmp_path / "c" / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}}, {"epoch": 1})
    contents, meta = load_checkpoint(path)
    assert torch.equal(contents["model"]["w"], torch.arange(3.0)) and meta == {"epoch": 1}

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}}, {"epoch": 2})
    monkeypatch.undo()
    contents, meta = load_checkpoint(path)  # the old checkpoint survived, no temporary file left
    assert meta["epoch"] == 1 and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    # a pickle with code in it is not loaded
    evil = {"format": "pylandmark.TrainCheckpoint/1", "x": _Payload()}
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(ValueError, match="tensors-only"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pylandmark training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(path, {}, {"bad": object()})


def _cli(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_cli_options_come_from_the_config_fields(tmp_path):
    """Every TrainConfig field has an option of its type; options not given keep the preset's value."""
    import dataclasses

    from pylandmark.training.cli import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {o for a in parser._actions for o in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert ("--out" if f.name == "out_dir" else "--" + f.name.replace("_", "-")) in flags, f.name
    cfg = config_from_args(_cli("--data-root", tmp_path, "--out", tmp_path / "o", "--preset", "test"))
    assert cfg == TrainConfig.from_preset("test", data_root=str(tmp_path), out_dir=str(tmp_path / "o"))
    cfg = config_from_args(_cli("--data-root", "d", "--out", "o", "--lr", "1e-3", "--epochs", 7, "--recall-ks", 1, 3,
                                "--no-progress", "--channels-last", "--whitening", "pca", "--model-args",
                                '{"backbone_args": {"depths": [1, 1, 1, 1, 1]}}', "--test-datasets", "rparis6k"))
    assert (cfg.lr, cfg.epochs, cfg.recall_ks, cfg.progress, cfg.channels_last, cfg.whitening) == \
        (1e-3, 7, (1, 3), False, True, "pca")
    assert cfg.model_args == {"backbone_args": {"depths": [1, 1, 1, 1, 1]}} and cfg.test_datasets == ("rparis6k",)
    assert cfg.margin == TRAIN_PRESETS["cspdarknet53-gem"].margin
    for bad in (["--epochs", "2.5"], ["--loss", "hinge"], ["--model-args", "[1]"]):
        with pytest.raises(SystemExit):
            _cli("--data-root", "d", "--out", "o", *bad)


def test_resume_reproduces_the_uninterrupted_run(small_root, tmp_path):
    common = ["--data-root", small_root, "--preset", "test", "--image-size", 48, "--query-size", 12,
              "--pool-size", 30, "--negatives", 3, "--batch-size", 4, "--validate-every", 2, "--no-progress"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(_cli(*common, "--out", full, "--epochs", 3)) == 0
    # interrupted after 2 epochs (its last epoch validates, the uninterrupted run's does not), then resumed
    assert run(_cli(*common, "--out", part, "--epochs", 2)) == 0
    assert run(_cli(*common, "--out", part, "--epochs", 3, "--resume")) == 0
    a, meta_a = load_checkpoint(full / "checkpoints" / "last.pt")
    b, meta_b = load_checkpoint(part / "checkpoints" / "last.pt")
    assert meta_a["epoch"] == meta_b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert a["scheduler"] == b["scheduler"]
    assert [h["loss"] for h in meta_a["history"]] == [h["loss"] for h in meta_b["history"]]
    # the resumed process restored the generators of the end of epoch 2 (not reseeded): they end equal
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["numpy_meta"] == b["rng"]["numpy_meta"] and a["rng"]["python"] == b["rng"]["python"]
    assert torch.equal(a["rng"]["numpy_keys"], b["rng"]["numpy_keys"])
    # one log row per epoch, written from the checkpointed history
    rows = (part / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("epoch,loss,lr,p")
    assert len((part / "log.jsonl").read_text().strip().splitlines()) == 3
    # the exported network is the best checkpoint's
    best, _ = load_checkpoint(full / "checkpoints" / "best.pt")
    exported = LandmarkNet.from_pretrained(full / "model_best")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, best["model"][k]), k


def test_resume_guards_and_tensorboard(small_root, tmp_path, caplog):
    cfg = _small_cfg(small_root, tmp_path / "g", epochs=1, validate_every=0, tensorboard=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(cfg, resume=True)
    with caplog.at_level("INFO", logger="pylandmark.training.loop"):
        path = train(cfg)
    assert path == tmp_path / "g" / "model"
    assert "epoch 1  loss" in caplog.text  # the console line
    try:  # TensorBoard is optional: with the package the scalars are written, without it a warning says so
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        assert "tensorboard" in caplog.text and "not installed" in caplog.text
    else:
        acc = EventAccumulator(str(tmp_path / "g" / "tensorboard"))
        acc.Reload()
        assert {"loss", "lr", "p", "images_per_s"} <= set(acc.Tags()["scalars"])
        assert [e.step for e in acc.Scalars("loss")] == [1]
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        train(cfg)
    with pytest.raises(ValueError, match="lr: checkpoint"):
        train(cfg, resume=True, lr=1e-2, epochs=2)
    with pytest.raises(ValueError, match="data_root"):
        train(cfg, data_root="")


def test_missing_tensorboard_only_warns(tmp_path, monkeypatch, caplog):
    import sys

    from pylandmark.training.runlog import RunLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level("WARNING", logger="pylandmark.training.runlog"):
        log = RunLog(tmp_path, tensorboard=True, enabled=True)
    assert log.writer is None and "pip install tensorboard" in caplog.text
    log.write([{"epoch": 1, "loss": 0.5}])
    assert (tmp_path / "log.csv").read_text().splitlines() == ["epoch,loss", "1,0.5"]


# ----------------------------------------------------------------------------- whitening, validation


@pytest.mark.parametrize("kind", ["lw", "pca"])
def test_whitening_and_revisited_validation(small_root, tmp_path, kind):
    test_root = tmp_path / "revisited"
    make_revisited_dataset(test_root, "roxford5k", n_clusters=3, db_per_cluster=4, image_size=48, seed=2)
    cfg = _small_cfg(small_root, tmp_path / "w", epochs=1, whitening=kind, whiten_dim=16, test_root=str(test_root))
    path = train(cfg)
    assert path.name == "model_best"
    hist = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert {"roxford5k_map_easy", "roxford5k_map_medium", "roxford5k_map_hard"} <= set(hist[-1])
    assert "val_map" not in hist[-1]
    net = LandmarkNet.from_pretrained(path)
    assert net.config.whitening and net.dim == 16
    # the installed layer is the learned whitening of the un-whitened network's descriptors
    w = Whitening.load(tmp_path / "w" / f"whitening_{kind}.safetensors")
    assert w.kind == kind and w.dim == 24
    x = SfM120k(small_root, "train").load_image(0, 48).unsqueeze(0)
    with torch.no_grad():
        base = strip_whitening(net).eval()(x).double().numpy()
        got = net.eval()(x).double().numpy()
    np.testing.assert_allclose(got, apply_whitening(base, w.mean, w.projection, 16), atol=2e-5)


class _Thumbnail(torch.nn.Module):
    """A fixed descriptor (2x2 colour thumbnail, L2-normalised) whose similarities are well spread,
    so that the ranking does not hinge on float rounding."""

    dim = 12

    def forward(self, x):
        v = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("rank_pairs", [None, 5])
def test_validate_sfm_metrics_against_brute_force(small_root, monkeypatch, rank_pairs):
    from pylandmark.training import validation

    if rank_pairs is not None:  # the rankings of one query at a time: the same numbers
        monkeypatch.setattr(validation, "_RANK_PAIRS", rank_pairs)
    model = _Thumbnail()
    cfg = _small_cfg(small_root, "unused")
    val = SfM120k(small_root, "val")
    metrics = validate(model, cfg, val, device="cpu")
    from pylandmark.extraction import extract

    d = extract(model, val.images, image_size=48, progress=False).astype(np.float64)
    sims = d @ d.T
    recall1, recall5, aps = [], [], {}
    for q, p in zip(val.qidxs, val.pidxs):
        order = [j for j in np.argsort(-sims[q], kind="stable") if j != q]
        recall1.append(order[0] == p)
        recall5.append(p in order[:5])
        pos = [r for r, j in enumerate(order) if val.clusters[j] == val.clusters[q]]
        # trapezoid AP of REFERENCE §3 without junk
        aps[q] = sum((i / r if r else 1.0) / 2 + (i + 1) / (r + 1) / 2 for i, r in enumerate(pos)) / len(pos)
    assert metrics["val_recall@1"] == pytest.approx(np.mean(recall1))
    assert metrics["val_recall@5"] == pytest.approx(np.mean(recall5))
    assert metrics["val_map"] == pytest.approx(np.mean(list(aps.values())), abs=1e-9)
    assert metrics["score"] == metrics["val_map"] and 0.2 < metrics["val_map"] < 1


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow  # eight epochs of real training: minutes on two cores
def test_short_run_learns(tmp_path):
    root = make_sfm_dataset(tmp_path / "data", n_clusters=84, images_per_cluster=6, image_size=96, seed=0,
                            val_clusters=12)
    cfg = TrainConfig.from_preset("test", data_root=str(root), out_dir=str(tmp_path / "run"), seed=0,
                                  validate_initial=True)
    train(cfg)
    hist = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    maps = [h["val_map"] for h in hist]
    print("val mAP by epoch (%): " + ", ".join(f"{100 * m:.1f}" for m in maps))
    before, last3 = maps[0], maps[-3:]
    assert len(maps) == cfg.epochs + 1
    # the trained network retrieves unseen clusters clearly better than the untrained one, at the
    # end of training and not only at one lucky epoch
    assert min(last3) > before + 0.06, maps
    assert np.mean(last3) > before + 0.08, maps
    # and the training loss went down
    assert hist[-1]["loss"] < hist[1]["loss"]
