"""Files from elsewhere get bounded work and a clear error: hostile pickles (shared nested
lists, cycles, deep nesting, code), oversized inputs. Each case runs in a child process with a
time and memory limit, so a regression fails the test instead of hanging the suite."""
from __future__ import annotations

import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pylandmark.data import safe_pickle


def shared_nested(levels: int = 40):
    """A few hundred bytes pickled; 2^(levels+1) elements as a tree."""
    x = [0]
    for _ in range(levels):
        x = [x, x]
    return x


def shared_wide():
    """Three levels of one list of 1000 reused 1000 times: 10^9 elements as a tree."""
    x = list(range(1000))
    return [[x] * 1000] * 1000


BOMBS = {"deep": shared_nested, "wide": shared_wide}
REFUSED = "elements|nested deeper"


def cyclic():
    x = [1]
    x.append(x)
    return x


def deep(levels: int = 200):
    x = [0]
    for _ in range(levels):
        x = [x]
    return x


def run_bounded(code: str, seconds: float = 60, memory_gb: float = 3) -> subprocess.CompletedProcess:
    """Runs `code` in a child with an address-space limit; the test fails on a timeout."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({int(memory_gb * 2**30)}, {int(memory_gb * 2**30)}))
    """)
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                              text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {seconds} s (unbounded work on a hostile file)")


def expect_refusal(code: str, words: str) -> None:
    proc = run_bounded(code + "\nprint('LOADED')\n")
    assert "LOADED" not in proc.stdout, "the hostile file was accepted"
    assert "PickleRefused" in proc.stderr and re.search(words, proc.stderr), proc.stderr[-2000:]
    assert "MemoryError" not in proc.stderr


def gnd(**changes):
    cfg = {"imlist": [f"im{i}" for i in range(9)], "qimlist": ["q0"],
           "gnd": [{"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [0], "hard": [1], "junk": [2]}]}
    for key, value in changes.items():
        if key in ("easy", "hard", "junk", "bbx"):
            cfg["gnd"][0][key] = value
        else:
            cfg[key] = value
    return cfg


@pytest.mark.parametrize("bomb", sorted(BOMBS))
@pytest.mark.parametrize("where", ["junk", "imlist", "gnd"])
def test_ground_truth_with_a_shared_nested_list_is_refused_quickly(tmp_path, where, bomb):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(gnd(**{where: BOMBS[bomb]()}), protocol=2))
    assert path.stat().st_size < 10000
    expect_refusal(f"from pylandmark.data.revisited import load_gnd; load_gnd({str(path)!r})", REFUSED)


@pytest.mark.parametrize("split,key", [("train", "cluster"), ("val", "qidxs"), ("train", "cids")])
def test_sfm_db_with_a_shared_nested_list_is_refused_quickly(tmp_path, split, key):
    entry = {"cids": [f"{i:08d}" for i in range(4)], "cluster": [0, 0, 1, 1], "qidxs": [0, 2], "pidxs": [1, 3]}
    db = {"train": dict(entry), "val": dict(entry)}
    db[split][key] = shared_wide()
    (tmp_path / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(db, protocol=2))
    expect_refusal(f"from pylandmark.data import SfM120k; SfM120k({str(tmp_path)!r}, {split!r})", REFUSED)


def test_whitening_pairs_with_a_shared_nested_list_are_refused_quickly(tmp_path):
    wh = {"cids": [f"{i:08d}" for i in range(4)], "qidxs": shared_nested(), "pidxs": shared_wide()}
    (tmp_path / "retrieval-SfM-120k-whiten.pkl").write_bytes(pickle.dumps(wh, protocol=2))
    expect_refusal(f"from pylandmark.data import WhiteningPairs; WhiteningPairs({str(tmp_path)!r})", REFUSED)


@pytest.mark.parametrize("obj,words", [
    (shared_nested(), "nested deeper"),
    (shared_wide(), "elements"),
    (cyclic(), "contains itself"),
    (deep(), "nested deeper"),
    ({"a": {1, 2}}, "refusing to load (__builtin__|builtins).set"),
    ({"a": np.dtype("f8")}, "holds a Float64DType"),
    ({"a": np.array([object(), None], dtype=object)[1:]}, "numpy object"),
])
def test_the_walk_bounds_depth_count_and_types(obj, words):
    data = pickle.dumps(obj, protocol=2)
    with pytest.raises(safe_pickle.PickleRefused, match=words):
        safe_pickle.loads(data, "x.pkl", numpy=True)


def test_memo_reuse_within_bounds_is_read_once():
    """A shared list is counted as often as it is reachable, but walked once: 2^14 leaves read
    fine, and the object is what the stdlib unpickler makes of the same bytes."""
    obj = shared_nested(13)
    data = pickle.dumps(obj, protocol=2)
    assert safe_pickle.loads(data, "x.pkl") == pickle.loads(data)
    with pytest.raises(safe_pickle.PickleRefused, match="elements"):
        safe_pickle.loads(data, "x.pkl", max_items=2 ** 14)


def test_the_real_ground_truth_reads_like_the_stdlib(shared_data):
    for name in ("roxford5k", "rparis6k"):
        path = next((shared_data / "revisited").rglob(f"gnd_{name}.pkl"))
        data = path.read_bytes()
        assert safe_pickle.loads(data, name) == pickle.loads(data, encoding="latin1")


def test_size_limit_and_globals(tmp_path):
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(list(range(1000))))
    with pytest.raises(safe_pickle.PickleRefused, match="larger than 100 bytes"):
        safe_pickle.load(path, max_bytes=100)
    arr = pickle.dumps(np.arange(3))
    with pytest.raises(safe_pickle.PickleRefused, match="refusing to load numpy"):
        safe_pickle.loads(arr, "x")  # numpy only where asked for
    assert safe_pickle.loads(arr, "x", numpy=True).tolist() == [0, 1, 2]
    for bad in (b"", b"\x80\x02]q\x00(K\x01", b"garbage"):
        with pytest.raises(safe_pickle.PickleRefused, match="not a readable pickle"):
            safe_pickle.loads(bad, "x")


@pytest.mark.parametrize("values,where,words", [
    ([1, 2.5], "a", "flat list of ints"),
    ([[1], [2]], "a", "flat list of ints"),
    ([True, 1], "a", "flat list of ints"),
    ([1, 2 ** 70], "a", "beyond int64"),
    (np.zeros((2, 2), np.int64), "a", "shape"),
    ([0, 5], "a", "outside [0, 5)"),
])
def test_index_array_validator(values, where, words):
    with pytest.raises(safe_pickle.PickleRefused, match=words.replace("[", r"\[").replace(")", r"\)")):
        safe_pickle.index_array(values, where, 5)


# ---- model directories from elsewhere ------------------------------------------------------------

TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}


@pytest.fixture
def model_dir(tmp_path):
    import torch
    from pylandmark.models import LandmarkNet

    torch.manual_seed(0)
    return LandmarkNet(backbone_args=TINY).save(tmp_path / "net")


def edit_config(folder: Path, change) -> Path:
    import json

    meta = json.loads((folder / "config.json").read_text())
    change(meta)
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def test_a_config_with_huge_depths_is_refused_quickly(model_dir):
    edit_config(model_dir, lambda m: m["config"]["backbone_args"].update(depths=[10 ** 7, 1, 1, 1, 1]))
    proc = run_bounded(f"from pylandmark.models import LandmarkNet; LandmarkNet.from_pretrained({str(model_dir)!r})",
                       seconds=60)
    assert proc.returncode != 0 and "ValueError" in proc.stderr and "depths" in proc.stderr, proc.stderr[-1500:]


@pytest.mark.parametrize("change,words", [
    (lambda m: m["config"].update(learn_p="false"), "learn_p must be true or false"),
    (lambda m: m["config"].update(whitening=1), "whitening must be true or false"),
    (lambda m: m["config"].update(p="3"), "p must be a finite number"),
    (lambda m: m["config"].update(p=float("nan")), "p must be a finite number"),
    (lambda m: m["config"].update(p=1e9), r"p must lie in"),
    (lambda m: m["config"].update(mean=[0.5, 0.5]), "mean must be a list of 3"),
    (lambda m: m["config"]["backbone_args"].update(out_chs=[8, 16, 24, 32, 4.5]), "out_chs must be"),
    (lambda m: m["config"]["backbone_args"].update(depths=[1, 1, 1, 1, 65]), "depths must lie in"),
    (lambda m: m["config"]["backbone_args"].update(depths=[1] * 100, out_chs=[8] * 100), "depths must be"),
    (lambda m: m.update(format_version="1"), "format_version must be an integer"),
    (lambda m: m.update(weights="../elsewhere/model.safetensors"), "inside"),
    (lambda m: m.update(weights=7), "must name a file"),
    (lambda m: m["config"]["backbone_args"].update(out_chs=[16, 32, 48, 64, 2048]), "do not belong together"),
])
def test_bad_config_values_raise_one_line_value_errors(model_dir, change, words):
    from pylandmark.models import LandmarkNet

    edit_config(model_dir, change)
    with pytest.raises(ValueError, match=words) as info:
        LandmarkNet.from_pretrained(model_dir)
    assert "\n" not in str(info.value)


def test_weights_outside_the_model_directory_are_never_read(model_dir, tmp_path):
    import shutil
    from pylandmark.models import LandmarkNet

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(model_dir / "model.safetensors", outside / "model.safetensors")
    for name in ("../elsewhere/model.safetensors", str(outside / "model.safetensors")):
        edit_config(model_dir, lambda m: m.update(weights=name))
        with pytest.raises(ValueError, match="inside"):
            LandmarkNet.from_pretrained(model_dir)


def test_config_json_that_is_not_json(model_dir):
    from pylandmark.models import LandmarkNet

    for text in ('{"format": ', "[" * 100000, '{"format": "pylandmark.LandmarkNet", "config": [1]}'):
        (model_dir / "config.json").write_text(text)
        with pytest.raises(ValueError, match="config.json"):
            LandmarkNet.from_pretrained(model_dir)


def test_wrong_shaped_weights_give_one_line(model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from pylandmark.models import LandmarkNet

    state = load_file(str(model_dir / "model.safetensors"))
    key = "backbone.stem.conv1.conv.weight"
    state[key] = torch.zeros(8, 3, 3, 3)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensors have other shapes \(backbone.stem.conv1") as info:
        LandmarkNet.from_pretrained(model_dir)
    assert "\n" not in str(info.value)
    del state[key]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="1 tensors missing .*1 unexpected"):
        LandmarkNet.from_pretrained(model_dir)


def test_train_config_from_a_file_is_type_checked():
    from pylandmark.training.loop import TrainConfig

    for bad, words in (({"epochs": "5"}, "epochs must be an integer"), ({"progress": "no"}, "true or false"),
                       ({"lr": float("inf")}, "lr must be a finite number"), ({"recall_ks": [1, "5"]}, "recall_ks")):
        with pytest.raises(ValueError, match=words):
            TrainConfig.from_dict(bad)
    assert TrainConfig.from_dict({"epochs": 3, "data_root": "x"}).epochs == 3


def test_weights_files_that_are_not_state_dicts(model_dir):
    import torch
    from pylandmark.models import LandmarkNet

    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + bytes(1 << 20))
    with pytest.raises(ValueError, match="as safetensors"):
        LandmarkNet.from_pretrained(model_dir)
    torch.save({"pad": torch.zeros(1 << 17), "backbone.stem.conv1.conv.weight": [1, 2]}, model_dir / "model.pt")
    edit_config(model_dir, lambda m: m.update(weights="model.pt"))
    with pytest.raises(ValueError, match="only named tensors"):
        LandmarkNet.from_pretrained(model_dir)
