"""Files from elsewhere (issue 26): JSON nested deeper than any file pylandmark writes is refused
with the file's own one-line error before it is parsed (never a RecursionError), and names read
from such files (ground-truth image names, SfM image ids, a results page's image paths, a model
directory's files, shard file names) never lead outside their folder."""
from __future__ import annotations

import json
import pickle
import re
import struct
import zlib
from pathlib import Path

import pytest

import pylandmark as plm
from pylandmark._files import MAX_JSON_DEPTH, inside, json_depth, parse_json
from pylandmark.retrieval.format import IndexFormatError

DEEP = 100_000  # far past the parser's recursion limit
JUST_TOO_DEEP = MAX_JSON_DEPTH + 50  # within the recursion limit: json.loads alone accepts it


def nested(levels: int, leaf: str = "1") -> str:
    return "[" * levels + leaf + "]" * levels


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ---- the bounded parser ------------------------------------------------------------------------

@pytest.mark.parametrize("text, depth", [
    ("1", 0), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('["[[[[", "\\"[[", "\\\\"]', 1),
    ('[["\\\\\\"]]]]"]]', 2), ('{"k\\"{": "}\\\\"}', 1), (nested(500), 500),
])
def test_json_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text.encode()) == depth


def test_json_depth_across_chunks(monkeypatch):
    import pylandmark._files as files

    text = json.dumps([{"a\\\"[": ["\\\\", "[{", [[1]]]}] * 50).encode()
    expected = json_depth(text)
    assert expected == 5
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(files, "_DEPTH_CHUNK", chunk)
        assert json_depth(text) == expected


@pytest.mark.parametrize("levels", [JUST_TOO_DEEP, DEEP])
def test_parse_json_refuses_deep_nesting_before_parsing(levels, monkeypatch):
    def no_parse(*a, **k):
        raise AssertionError("parsed")

    monkeypatch.setattr(json, "loads", no_parse)
    for data in (nested(levels), nested(levels).encode(), nested(levels).encode("utf-16")):
        with pytest.raises(ValueError, match=f"nested more than {MAX_JSON_DEPTH} levels") as info:
            parse_json(data, what="x.json", max_bytes=None)
        assert one_line(info).startswith("x.json ")


def test_parse_json_bounds_size_and_keeps_its_callers_error_type():
    class MyError(ValueError):
        pass

    assert parse_json(b'{"a": [1, 2]}', what="f", max_bytes=100) == {"a": [1, 2]}
    with pytest.raises(MyError, match="more than the 10"):
        parse_json(b"[" + b"1," * 20 + b"1]", what="f", max_bytes=10, error=MyError)
    with pytest.raises(MyError, match="not valid JSON"):
        parse_json(b'{"a": ', what="f", max_bytes=100, error=MyError)
    with pytest.raises(MyError, match="not utf-8 text"):
        parse_json(b'["\xff"]', what="f", max_bytes=100, error=MyError)
    with pytest.raises(MyError, match="nested more than 2"):
        parse_json("[[[1]]]", what="f", max_bytes=None, max_depth=2, error=MyError)


# ---- JSON in index headers, sections and manifests ---------------------------------------------

def _write(path: Path, magic: bytes, body: bytes) -> Path:
    path.write_bytes(struct.pack("<8sIIII", magic, 1, len(body), zlib.crc32(body), 0) + body)
    return path


@pytest.mark.parametrize("levels", [JUST_TOO_DEEP, DEEP])
def test_deeply_nested_manifest_is_an_index_format_error(tmp_path, levels, capsys):
    from pylandmark.cli import main
    from pylandmark.retrieval.manifest import read_manifest

    body = ('{"dim": 4, "metric": "cosine", "count": 0, "shards": [], "metadata": ' + nested(levels, "{}")
            + "}").encode()
    manifest = _write(tmp_path / "deep.plmi", b"PLMSHARD", body)
    with pytest.raises(IndexFormatError, match="nested more than") as info:
        read_manifest(manifest)
    assert str(manifest) in one_line(info)
    with pytest.raises(IndexFormatError, match="nested more than"):
        plm.Index.load(manifest)
    assert main(["index", "info", str(manifest)]) == 2  # a user error, not a crash (exit 1)
    err = capsys.readouterr().err
    assert "nested more than" in err and err.count("\n") == 1


@pytest.mark.parametrize("levels", [JUST_TOO_DEEP, DEEP])
def test_deeply_nested_index_header_is_an_index_format_error(tmp_path, levels):
    body = ('{"dim": 4, "count": 0, "metric": "cosine", "dtype": "float16", "metadata": '
            + nested(levels, "{}") + "}").encode()
    path = _write(tmp_path / "deep.plmi", b"PLMINDEX", body)
    with pytest.raises(IndexFormatError, match="nested more than") as info:
        plm.Index.load(path)
    assert str(path) in one_line(info)


def test_index_metadata_nested_within_the_bound_round_trips(tmp_path, rng):
    meta = {"deep": json.loads(nested(MAX_JSON_DEPTH - 2))}
    index = plm.Index(4, metadata=meta)
    index.add(rng.standard_normal((3, 4)), labels=["a", "b", "c"], paths=["/1", "/2", "/3"])
    assert plm.Index.load(index.save(tmp_path / "ok.plmi")).metadata == meta


def test_shard_names_in_a_manifest_stay_in_the_shard_folder(tmp_path):
    from pylandmark.retrieval.manifest import read_manifest

    for name in ("../x.plmi", "/abs/x.plmi", "a/../../x.plmi", "..\\x.plmi", ".hidden.plmi"):
        body = json.dumps({"dim": 4, "metric": "cosine", "count": 1, "metadata": {},
                           "shards": [{"file": name, "count": 1, "id_offset": 0, "header_crc": 0}]}).encode()
        with pytest.raises(IndexFormatError, match="plain"):
            read_manifest(_write(tmp_path / "m.plmi", b"PLMSHARD", body))


# ---- results files for report pages ------------------------------------------------------------

def _results(path: Path, query: str = "q.jpg", neighbour: str | None = "/data/img/1.jpg") -> Path:
    path.write_text(json.dumps([{"query": query, "neighbours": [{"score": 0.9, "id": 1, "label": "a",
                                                                  "path": neighbour}]}]))
    return path


def test_results_nested_past_the_bound_are_refused(tmp_path):
    from pylandmark.report.results import ResultsFormatError, load_results

    p = tmp_path / "r.json"
    p.write_text(nested(JUST_TOO_DEEP, "{}"))
    with pytest.raises(ResultsFormatError, match="nested more than") as info:
        load_results(p)
    assert str(p) in one_line(info)


@pytest.mark.parametrize("field", ["query", "neighbour"])
@pytest.mark.parametrize("name", ["../../../private/holiday.jpg", "img/../../x.jpg", "..\\..\\x.jpg"])
def test_relative_result_paths_that_climb_out_are_refused(tmp_path, field, name):
    from pylandmark.report.results import ResultsFormatError, load_results

    p = _results(tmp_path / "r.json", **{field: name})
    with pytest.raises(ResultsFormatError, match=re.escape("must be a relative path inside")) as info:
        load_results(p)
    assert ("'query'" if field == "query" else "'path'") in one_line(info)


def test_results_paths_the_commands_write_still_load(tmp_path):
    from pylandmark.report.results import load_results

    # absolute paths (an index stores them so), names next to the results file, no path at all
    for query, neighbour in (("/photos/q.jpg", "/data/1.jpg"), ("q.jpg", "imgs/1.jpg"), ("q", None)):
        assert load_results(_results(tmp_path / "r.json", query, neighbour))[0]["query"] == query


# ---- model directories -------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    from pylandmark.models import LandmarkNet

    return LandmarkNet(backbone_args={"depths": [1, 2, 1, 1, 1], "out_chs": [8, 16, 16, 24, 32]}).save(tmp_path / "m")


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta.update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


def test_model_config_nested_past_the_bound_is_refused(model_dir):
    from pylandmark.models import LandmarkNet

    _edit_config(model_dir, notes=json.loads(nested(JUST_TOO_DEEP)))
    with pytest.raises(ValueError, match="nested more than") as info:
        LandmarkNet.from_pretrained(model_dir)
    assert "config.json" in one_line(info)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/whitenings.safetensors"])
def test_model_whitenings_file_stays_in_the_model_directory(model_dir, name):
    from pylandmark.models import LandmarkNet

    _edit_config(model_dir, whitenings=name)
    with pytest.raises(ValueError, match="'whitenings' must be a relative path inside") as info:
        LandmarkNet.from_pretrained(model_dir)
    one_line(info)


# ---- ground truth and SfM image names ----------------------------------------------------------

NAMES_OUT = ["../../../private/holiday", "/etc/passwd", "sub/../../x", "..\\..\\x", "C:x"]


@pytest.mark.parametrize("key", ["imlist", "qimlist"])
@pytest.mark.parametrize("name", NAMES_OUT)
def test_ground_truth_names_stay_in_the_image_folder(tmp_path, key, name):
    from pylandmark.data import RevisitedDataset, load_gnd

    cfg = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 2, 2], "easy": [0], "hard": [],
                                                              "junk": []}]}
    cfg[key] = [*cfg[key], name]
    if key == "qimlist":
        cfg["gnd"].append({"bbx": None, "easy": [1], "hard": [], "junk": []})
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{key}\[\d\] must be a relative path inside") as info:
        load_gnd(path)
    assert str(path) in one_line(info)
    with pytest.raises(ValueError, match="must be a relative path inside"):
        RevisitedDataset("roxford5k", tmp_path)


def test_synthetic_ground_truth_and_subfolder_names_still_load(tmp_path):
    from pylandmark.data import load_gnd

    cfg = {"imlist": ["a", "sub/b", "c..d"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [], "junk": []}]}
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(cfg))
    assert load_gnd(tmp_path / "g.pkl")["imlist"] == ["a", "sub/b", "c..d"]


def test_distractor_list_names_stay_in_the_distractor_folder(tmp_path):
    from pylandmark.data import RevisitedDataset

    gnd = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    gnd.parent.mkdir()
    gnd.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": []}))
    folder = tmp_path / "revisitop1m"
    folder.mkdir()
    (folder / "revisitop1m.txt").write_text("a/1\n\n../../secret\n")
    with pytest.raises(ValueError, match=r"revisitop1m.txt: line 3 must be a relative path inside") as info:
        RevisitedDataset("roxford5k", tmp_path, distractors=True)
    one_line(info)


@pytest.mark.parametrize("cid", ["../../../../etc/passwd", "ab....", "/etc/passwd-xx", "abcdef\\..", "C:abcdef"])
@pytest.mark.parametrize("whitening", [False, True])
def test_sfm_image_ids_stay_in_the_image_folder(tmp_path, cid, whitening):
    from pylandmark.data import SfM120k, WhiteningPairs
    from pylandmark.data.sfm120k import cid_to_path

    cids = ["0123456789abcdef", cid]
    if whitening:
        (tmp_path / "retrieval-SfM-120k-whiten.pkl").write_bytes(
            pickle.dumps({"cids": cids, "qidxs": [0], "pidxs": [1]}))
    else:
        split = {"cids": cids, "cluster": [0, 0], "qidxs": [0], "pidxs": [1]}
        (tmp_path / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps({"train": split, "val": split}))
    with pytest.raises(ValueError, match=re.escape("['cids'][1]: the image path of id")) as info:
        WhiteningPairs(tmp_path) if whitening else SfM120k(tmp_path, "train")
    assert "must be a relative path inside" in one_line(info)
    with pytest.raises(ValueError, match="must be a relative path inside"):
        cid_to_path(tmp_path, cid)
    assert cid_to_path(tmp_path, "0123456789abcdef") == tmp_path / "ims" / "ef" / "cd" / "ab" / "0123456789abcdef"


# ---- the helper --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "a/b.jpg", "a..b", "./a", "a/./b"])
def test_inside_keeps_names_below_the_root(tmp_path, name):
    assert inside(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize("name", ["", "..", "../a", "a/../../b", "a/..", "/abs", "\\\\server\\share\\x", "C:x",
                                  "a\\..\\..\\b", "a\0b", 3, None])
def test_inside_refuses_names_that_could_leave_the_root(tmp_path, name):
    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="^image 7 must be a") as info:
        inside(tmp_path, name, "image 7", error=MyError)
    one_line(info)


def test_wide_json_is_bounded_by_size_not_depth():
    # a wide file stays fine: the depth scan is linear in the bytes
    data = json.dumps([[i, str(i)] for i in range(100_000)]).encode()
    assert json_depth(data) == 2 and len(parse_json(data, what="w", max_bytes=len(data))) == 100_000


def test_a_pickle_memo_index_beyond_its_size_is_refused_before_allocating():
    """`LONG_BINPUT 1561162084` makes CPython's unpickler grow its memo array to 12 GB (found by
    tests/test_fuzz.py's pickle target as an out-of-memory): refused in one line, at once."""
    import pickle
    import resource

    from pylandmark.data import safe_pickle

    data = b"\x80\x02]r" + (1561162084).to_bytes(4, "little") + b"."
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(safe_pickle.PickleRefused, match="memo index 1561162084 is beyond"):
        safe_pickle.loads(data, "crafted.pkl")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing near 12 GB
    ok = pickle.dumps([{"imlist": ["a"] * 3}] * 2, protocol=2)  # memo indexes of a real pickle pass
    assert safe_pickle.loads(ok, "real.pkl") == [{"imlist": ["a"] * 3}] * 2


def test_a_crafted_numpy_dtype_state_is_refused():
    """Found by tests/test_fuzz.py (pickle target, a deadly signal under atheris): a dtype('i8')
    whose BUILD state is a 6-tuple (3, '<', None, -1, -1, 0) reaches numpy.dtype.__setstate__,
    which trusts it and corrupts memory. The restricted unpickler now checks dtype and array
    states before numpy sees them; the states numpy writes still load."""
    import numpy as np

    from pylandmark.data import safe_pickle

    crash = (b"\x80\x04\x95\xc2\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01x\x94\x8c\x16numpy._core.multiarray\x94"
             b"\x8c\x0c_reconstruct\x94\x93\x94\x8c\x05numpy\x94\x8c\x07ndarray\x94\x93\x94K\x00\x85\x94C\x01b\x94"
             b"\x87\x94R\x94(K\x01K\x02K\x03\x86\x94h\x05\x8c\x05dtype\x94\x93\x94\x8c\x02i8\x94\x89\x88\x87\x94R\x94"
             b"(K\x03\x8c\x01<\x94NN0J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b\x89C0"
             + b"".join(i.to_bytes(8, "little") for i in range(6)) + b"\x94t\x94bs.")
    with pytest.raises(safe_pickle.PickleRefused, match="dtype state"):
        safe_pickle.loads(crash, "fuzz input", numpy=True)
    # an array whose bytes do not match its shape, and state on a non-numpy object
    bad = pickle.dumps(np.arange(6)).replace(b"\x06\x85", b"\x07\x85")
    with pytest.raises(safe_pickle.PickleRefused):
        safe_pickle.loads(bad, "x", numpy=True)
    for obj in (np.arange(6).reshape(2, 3), np.array(["ab", "c"]), np.array([b"x"]), np.float32(3), np.zeros((0, 3))):
        for protocol in (2, 4, 5):
            back = safe_pickle.loads(pickle.dumps(obj, protocol=protocol), "x", numpy=True)
            assert np.array_equal(np.asarray(back), np.asarray(obj)) and np.asarray(back).dtype == np.asarray(obj).dtype
