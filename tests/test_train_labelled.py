"""Training on a team's own labelled photos: same-landmark pairs, the seeded hold-out, class
folders and landmark lists (Google Landmarks v2, path,label) with their one-line errors, layout
detection, validation on the held-out photos against a brute-force reference, and the loop on
them (exact resumption, export, whitening), ending with the PNU campus photos in ../shared."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pylandmark.data import SfM120k, make_sfm_dataset
from pylandmark.data.images import ImageLoadError
from pylandmark.data.labelled import (
    LabelledTrainingSet,
    detect_layout,
    held_out_split,
    read_landmark_csv,
    same_label_pairs,
)
from pylandmark.models import LandmarkNet
from pylandmark.training.checkpoint import load_checkpoint
from pylandmark.training.config import TrainConfig
from pylandmark.training.loop import train
from pylandmark.training.validation import validate

TINY = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}
PNU = Path(__file__).resolve().parents[2] / "shared" / "data" / "pnu_landmarks"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Class folders made of the synthetic SfM scenes: 10 landmarks of 5 views, plus one landmark
    with a single photo."""
    src = make_sfm_dataset(tmp_path_factory.mktemp("sfm"), n_clusters=11, images_per_cluster=5, image_size=64,
                           seed=3, val_clusters=0)
    train_split = SfM120k(src, "train")
    root = tmp_path_factory.mktemp("folders")
    seen: Counter = Counter()
    for path, c in zip(train_split.images, train_split.clusters):
        if c == 10 and seen[c]:
            continue  # landmark_10 keeps one photo
        seen[c] += 1
        (root / f"landmark_{c:02d}").mkdir(exist_ok=True)
        shutil.copyfile(path, root / f"landmark_{c:02d}" / f"{path.name}.jpg")
    return root


def _cfg(root, out, **kw) -> TrainConfig:
    base = dict(data_root=str(root), out_dir=str(out), model="cspdarknet53-gem", model_args=TINY, image_size=48,
                query_size=12, pool_size=30, negatives=3, batch_size=4, epochs=2, val_image_size=48,
                whiten_image_size=48, mining_batch_size=16, val_fraction=0.2)
    base.update(kw)
    return TrainConfig.from_preset("test", **base)


# ----------------------------------------------------------------------------- pairs and split


@pytest.mark.parametrize("positives", [1, 3, 7])
def test_same_label_pairs_follow_the_rule(positives):
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 9, size=53)
    targets[targets == 8] = 7  # and one label with a single image:
    targets[0] = 8
    q, p = same_label_pairs(targets, positives, seed=5)
    sizes = Counter(targets.tolist())
    per_query = Counter(q.tolist())
    for i, t in enumerate(targets):
        assert per_query.get(i, 0) == min(positives, sizes[t] - 1), i
    assert np.all(targets[q] == targets[p]) and np.all(q != p)
    assert len(set(zip(q.tolist(), p.tolist()))) == q.size  # no pair twice
    assert np.all(np.diff(q) >= 0)
    q2, p2 = same_label_pairs(targets, positives, seed=5)
    assert np.array_equal(q, q2) and np.array_equal(p, p2)
    if positives == 1:  # a draw, not a fixed choice: another seed picks other positives
        assert not np.array_equal(p, same_label_pairs(targets, positives, seed=6)[1])
    with pytest.raises(ValueError, match="positives"):
        same_label_pairs(targets, 0)
    with pytest.raises(ValueError, match="targets"):
        same_label_pairs(targets.astype(float), 2)


def test_held_out_split_is_per_landmark_and_seeded():
    targets = np.repeat(np.arange(6), [1, 2, 3, 5, 10, 21])
    held = held_out_split(targets, 0.2, seed=4)
    for label, n in enumerate([1, 2, 3, 5, 10, 21]):
        k = max(1, round(n * 0.2))
        expected = k if n - k >= 2 else 0  # a landmark keeps two photos, a training pair
        assert held[targets == label].sum() == expected, label
    assert np.array_equal(held, held_out_split(targets, 0.2, seed=4))
    assert not np.array_equal(held, held_out_split(targets, 0.2, seed=5))
    assert not held_out_split(targets, 0.0).any()
    with pytest.raises(ValueError, match="held-out fraction"):
        held_out_split(targets, 1.0)


def test_training_set_from_folders(folders):
    ds = LabelledTrainingSet.from_folders(folders, positives=2)
    assert len(ds) == 51 and len(ds.classes) == 11
    assert ds.labels[ds.images.index(next((folders / "landmark_10").iterdir()))] == "landmark_10"
    single = ds.classes.index("landmark_10")
    assert single not in ds.clusters[ds.qidxs] and single not in ds.clusters[ds.pidxs]  # a negative only
    assert ds.n_pairs == 50 * 2
    train, val = ds.split(0.2, seed=0)
    assert len(val.query_images) == 10 and len(train) == 41  # one of every 5-photo landmark
    assert set(val.query_images).isdisjoint(train.images) and val.db_images == train.images
    assert all(Path(p).parent.name == lab for p, lab in zip(val.query_images, val.query_labels))


def test_training_set_errors(tmp_path):
    def photos(root, counts):
        for c, n in counts.items():
            (root / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 16), (40 * i, 0, 0)).save(root / c / f"{i}.png")
        return root

    with pytest.raises(ValueError, match="no landmark has two images"):
        LabelledTrainingSet.from_folders(photos(tmp_path / "a", {"x": 1, "y": 1}))
    with pytest.raises(ValueError, match="one landmark"):
        LabelledTrainingSet.from_folders(photos(tmp_path / "b", {"x": 3}))
    root = photos(tmp_path / "c", {"x": 2, "y": 2})
    (root / "y" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match=r"broken\.png.*--bad-images skip"):
        LabelledTrainingSet.from_folders(root)
    assert len(LabelledTrainingSet.from_folders(root, bad_images="skip")) == 4


def test_landmark_lists(tmp_path):
    root = tmp_path / "gld"
    ids = ["a1b2c3", "a1b9ff", "0f00aa", "0f00ab", "99zz01"]
    for i, image_id in enumerate(ids):
        folder = root / image_id[0] / image_id[1] / image_id[2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), (50 * i, 10, 10)).save(folder / f"{image_id}.jpg")
    csv = tmp_path / "train.csv"
    csv.write_text("id,url,landmark_id\n" + "".join(f"{i},http://x,{lab}\n" for i, lab in
                                                     zip(ids, [7, 7, 12, 12, 3])))
    paths, labels = read_landmark_csv(csv, root)
    assert [p.relative_to(root).as_posix() for p in paths] == [f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]
    assert labels == ["7", "7", "12", "12", "3"]
    ds = LabelledTrainingSet.from_csv(csv, root)
    assert ds.n_pairs == 4 and sorted(ds.classes) == ["12", "3", "7"]

    plain = root / "list.csv"  # path,label relative to the list's folder
    plain.write_text("label,path\nbridge,a/1/b/a1b2c3.jpg\nbridge,a/1/b/a1b9ff.jpg\n")
    assert read_landmark_csv(plain)[1] == ["bridge", "bridge"]

    def bad(text, match, exc=ValueError, **kw):
        csv.write_text(text)
        with pytest.raises(exc, match=match):
            read_landmark_csv(csv, root, **kw)

    bad("image,landmark\n", r"train\.csv:1: the header .* neither")
    bad("", r"train\.csv: empty")
    bad("id,landmark_id\na1b2c3,7\na1b9ff\n", r"train\.csv:3: 1 field")
    bad("id,landmark_id\na1b2c3,\n", r"train\.csv:2: empty")
    bad("id,landmark_id\n../etc,1\n", r"train\.csv:2: image id")
    bad("path,label\n../outside.jpg,1\n", r"train\.csv:2: .*inside")
    bad("path,label\n/etc/passwd.jpg,1\n", r"train\.csv:2: .*inside")
    bad("path,label\nnotes.txt,1\n", r"train\.csv:2: 'notes.txt' is not an image")
    bad("id,landmark_id\na1b2c3,7\nabcdef,7\n", r"train\.csv:3: no image file .*--bad-images skip",
        FileNotFoundError)
    csv.write_text("id,landmark_id\na1b2c3,7\nabcdef,7\na1b9ff,7\n")
    assert read_landmark_csv(csv, root, missing="skip")[1] == ["7", "7"]


def test_detect_layout(folders, tmp_path):
    assert detect_layout(folders) == "folders"
    sfm = make_sfm_dataset(tmp_path / "sfm", n_clusters=3, images_per_cluster=2, image_size=32, val_clusters=1)
    assert detect_layout(sfm) == "sfm120k"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="neither SfM-120k .* nor class folders"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        detect_layout(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- validation


class _Thumbnail(torch.nn.Module):
    """A fixed descriptor (2x2 colour thumbnail, L2-normalised): well-spread similarities."""

    dim = 12

    def forward(self, x):
        v = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("rank_pairs, val_queries", [(None, None), (7, None), (None, 3), (5, 4)])
def test_held_out_validation_against_brute_force(folders, monkeypatch, rank_pairs, val_queries):
    from pylandmark.extraction import extract
    from pylandmark.training import validation

    if rank_pairs is not None:  # rankings of one or two queries at a time: the same numbers
        monkeypatch.setattr(validation, "_RANK_PAIRS", rank_pairs)
    _, val = LabelledTrainingSet.from_folders(folders).split(0.2, seed=0)
    cfg = _cfg(folders, "unused", val_queries=val_queries)
    metrics = validate(_Thumbnail(), cfg, val, device="cpu")
    chosen = validation.held_out_sample(len(val.query_images), len(val.db_images), val_queries, cfg.seed)
    if val_queries is None:
        assert chosen.tolist() == list(range(len(val.query_images)))
    else:  # a seeded sample of that many distinct photos
        assert len(set(chosen.tolist())) == val_queries < len(val.query_images)
        assert chosen.tolist() == sorted(chosen.tolist())
    q = extract(_Thumbnail(), [val.query_images[i] for i in chosen], image_size=48, progress=False).astype(np.float64)
    db = extract(_Thumbnail(), val.db_images, image_size=48, progress=False).astype(np.float64)
    sims = q @ db.T
    correct, aps = [], []
    for i, truth in enumerate(val.query_labels[j] for j in chosen):
        order = np.argsort(-sims[i], kind="stable")
        votes: dict[str, list[float]] = {}
        for j in order[:5]:  # majority of the 5 nearest; a tie goes to the larger summed similarity
            votes.setdefault(val.db_labels[j], []).append(sims[i, j])
        winner = max(votes, key=lambda lab: (len(votes[lab]), sum(votes[lab])))
        correct.append(winner == truth)
        pos = [r for r, j in enumerate(order) if val.db_labels[j] == truth]
        aps.append(sum((k / r if r else 1.0) / 2 + (k + 1) / (r + 1) / 2 for k, r in enumerate(pos)) / len(pos))
    assert metrics["val_accuracy"] == pytest.approx(np.mean(correct))
    assert metrics["val_map"] == pytest.approx(np.mean(aps), abs=1e-9)
    assert metrics["score"] == metrics["val_map"] and 0.2 < metrics["val_map"] < 1


def test_held_out_validation_samples_when_the_rankings_would_be_huge(monkeypatch, caplog):
    from pylandmark.training import validation

    monkeypatch.setattr(validation, "_DEFAULT_PAIRS", 1000)
    with caplog.at_level("WARNING", logger="pylandmark.training.validation"):
        chosen = validation.held_out_sample(50, 100, None, seed=3)  # 5,000 pairs: 10 queries fit
    assert len(chosen) == 10 and "sample of 10 of the 50 held-out photos" in caplog.text
    assert np.array_equal(chosen, validation.held_out_sample(50, 100, None, seed=3))
    assert not np.array_equal(chosen, validation.held_out_sample(50, 100, None, seed=4))
    assert len(validation.held_out_sample(50, 100, 30, seed=3)) == 30  # an explicit cap wins
    assert len(validation.held_out_sample(8, 100, None, seed=3)) == 8


# ----------------------------------------------------------------------------- the loop


def test_training_on_folders_resumes_exactly(folders, tmp_path):
    full = train(_cfg(folders, tmp_path / "full", whitening="lw", query_size=8))
    assert full == tmp_path / "full" / "model_best"
    train(_cfg(folders, tmp_path / "part", epochs=1, query_size=8))
    train(_cfg(folders, tmp_path / "part", query_size=8), resume=True)
    a, meta_a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b, meta_b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    def untimed(history):
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]

    assert untimed(meta_a["history"]) == untimed(meta_b["history"])
    rows = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in rows)
    assert all(0 < r["val_map"] <= 1 for r in rows)
    # the exported network carries the Lw learned from the training photos' landmark pairs
    net = LandmarkNet.from_pretrained(full)
    assert net.whiten is not None and (tmp_path / "full" / "whitening_lw.safetensors").is_file()


def test_training_on_a_landmark_list(folders, tmp_path):
    csv = tmp_path / "list.csv"
    photos = sorted(folders.glob("*/*.jpg"))
    csv.write_text("path,label\n" + "".join(f"{p.relative_to(folders).as_posix()},{p.parent.name}\n"
                                            for p in photos))
    out = train(_cfg(folders, tmp_path / "run", data_csv=str(csv), epochs=1, validate_every=0, query_size=8))
    assert out == tmp_path / "run" / "model"
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert meta["history"][0]["n_tuples"] == 8


# ----------------------------------------------------------------------------- PNU campus photos


@pytest.mark.skipif(not PNU.is_dir(), reason="../shared/data/pnu_landmarks is absent")
def test_pnu_train_resume_export_and_recognize(tmp_path, capsys):
    """The issue's smoke run: `pylandmark train --data-root <PNU train>` for one epoch, resumed to a
    second, validated on a held-out split, exported, then `index build` over train/ and
    `recognize` of test/ with the trained network (a smoke figure, not a quality claim)."""
    from pylandmark.cli import main

    args = ["train", "--preset", "test", "--data-root", str(PNU / "train"), "--out", str(tmp_path / "run"),
            "--image-size", "64", "--val-image-size", "64", "--query-size", "8", "--pool-size", "20",
            "--negatives", "2", "--batch-size", "4", "--val-fraction", "0.15", "--quiet"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_accuracy" in r and "val_map" in r for r in rows)
    model = tmp_path / "run" / "model_best"
    assert main(["index", "build", str(PNU / "train"), "--labels-from-folders", "--weights", str(model),
                 "--image-size", "64", "--out", str(tmp_path / "pnu.plmi"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["recognize", str(tmp_path / "pnu.plmi"), str(PNU / "test"), "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 15 and all(r["truth"] in {"cse", "hh", "rg", "wb", "wjj"} for r in results)
    print("PNU test/ top-5 vote accuracy after 2 epochs:",
          np.mean([r["label"] == r["truth"] for r in results]))


def test_arcface_training_learns_the_landmarks_and_drops_its_head(folders, tmp_path):
    """`--loss arcface`: the landmarks as classes through a head that is checkpointed (an exact
    resume) but not exported; on the training photos the head's loss falls."""
    kw = dict(loss="arcface", margin=0.2, arcface_scale=16.0, query_size=32, batch_size=8, lr=3e-3,
              validate_every=0)
    out = train(_cfg(folders, tmp_path / "full", epochs=2, **kw))
    train(_cfg(folders, tmp_path / "part", epochs=1, **kw))
    train(_cfg(folders, tmp_path / "part", epochs=2, **kw), resume=True)
    a, meta = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    b, _ = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert a["head"]["weight"].shape == (11, 24)  # 11 landmarks, the 24-d descriptor
    for k in (*a["model"], "head"):
        x, y = (a["head"]["weight"], b["head"]["weight"]) if k == "head" else (a["model"][k], b["model"][k])
        assert torch.equal(x, y), k
    losses = [row["loss"] for row in meta["history"]]
    assert losses[-1] < losses[0], losses  # a per-image mean: query_size images each epoch
    net = LandmarkNet.from_pretrained(out)
    assert not any("head" in k for k in net.state_dict())
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in LandmarkNet(net.config).named_parameters()]


def test_arcface_margin_is_an_angle(folders):
    with pytest.raises(ValueError, match="at most pi/2"):
        _cfg(folders, "unused", loss="arcface", margin=2.0)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("pycolmap"), reason="needs pycolmap")
def test_training_on_a_colmap_model(tmp_path):
    """`--colmap sparse/0`: the model becomes SfM-120k-format pairs under <out>/colmap-data (as
    pylandmark.data.colmap rules them) and one epoch trains on them."""
    import pycolmap

    from pylandmark.data.colmap import colmap_pairs

    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 3, 1, 4
    options.num_points3D = 120
    rec = pycolmap.synthesize_dataset(options)
    model = tmp_path / "sparse" / "0"
    model.mkdir(parents=True)
    rec.write(str(model))
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for image in rec.images.values():
        (images / image.name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 56, 3)) * 255).astype(np.uint8)).save(images / image.name, format="PNG")
    pairs = colmap_pairs(model, min_shared=5)
    out = train(_cfg(images, tmp_path / "run", colmap=str(model), colmap_min_shared=5, epochs=1, val_fraction=0.3,
                     query_size=8, pool_size=12, negatives=1, validate_every=0))
    assert out == tmp_path / "run" / "model"
    db = SfM120k(tmp_path / "run" / "colmap-data", "train")
    val = SfM120k(tmp_path / "run" / "colmap-data", "val")
    assert db.n_pairs + val.n_pairs == pairs.qidxs.size


def test_a_run_from_before_the_new_fields_resumes(folders, tmp_path):
    """A checkpoint whose config predates this issue's fields (positives, val_fraction, loss
    options, ...) resumes: an absent field had its default."""
    from pylandmark.training.loop import _check_resume_config

    cfg = _cfg(folders, tmp_path / "old", val_fraction=0.1)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("positives", "val_fraction", "data_csv", "colmap",
                                                                   "arcface_scale", "bad_images")}
    _check_resume_config(old, cfg)
    with pytest.raises(ValueError, match="positives: checkpoint 5 vs now 2"):
        _check_resume_config(old, _cfg(folders, tmp_path / "old", val_fraction=0.1, positives=2))
