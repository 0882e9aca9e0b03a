"""`pylandmark whiten`: a learned (Lw) or PCA whitening of a network's descriptors, written as a
file for `--whitening FILE` and optionally installed as the whitening layer of a new model
directory. Checked against float64 references written from the papers' definitions (not from
pylandmark.nn.whiten), on descriptors of real image files from a tiny network.

The tiny network's descriptors are full rank on purpose: a random network's last 1x1 convolution
leaves some channels negative everywhere, which GeM clamps to its eps (constant descriptor
dimensions, singular covariances, an Lw only defined through its regularisation). Adding the
mean |w| to that convolution's weights makes every channel respond.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_extraction import float16_bound

import pylandmark as plm
from pylandmark.cli import main
from pylandmark.data.images import load_image
from pylandmark.extraction import describe_batch, prepare_inference_model
from pylandmark.models import LandmarkNet
from pylandmark.models.whitening import install_whitening
from pylandmark.nn.whiten import Whitening

TINY = {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}
D = 24
SIZE = 96  # --image-size: the photos are 96 x 72, kept as they are
N = 43  # photos in db/
U64 = 2.0 ** -53


def _photo(rng: np.random.Generator, base: np.ndarray) -> Image.Image:
    """96 x 72: a landmark's coarse 8 x 6 pattern, varied per photo, plus pixel noise."""
    coarse = np.kron(base + 0.4 * rng.random(base.shape), np.ones((12, 12, 1)))
    return Image.fromarray((np.clip(coarse + 0.5 * rng.random(coarse.shape), 0, 1.5) / 1.5 * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """db/: 10 landmark folders of 3, 4, 5 or 6 photos (43 in all, whose pair differences span
    43 - 10 > D dimensions; with at most 6 photos each image is paired with every other of its
    landmark, so the pairs need no random draw);
    single/: 3 landmarks of one photo each; net/: the tiny network (no whitening layer)."""
    root = tmp_path_factory.mktemp("whiten_cli")
    rng = np.random.default_rng(3)
    for c in range(10):
        base = rng.random((6, 8, 3))
        for i in range(3 + c % 4):
            folder = root / "db" / f"l{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            _photo(rng, base).save(folder / f"im{i}.png")
    for c in range(3):
        (root / "single" / f"s{c}").mkdir(parents=True)
        _photo(rng, rng.random((6, 8, 3))).save(root / "single" / f"s{c}" / "only.png")
    torch.manual_seed(0)
    net = LandmarkNet(backbone_args=TINY)
    weight = net.backbone.stages[-1].conv_transition.conv.weight
    with torch.no_grad():
        weight.add_(weight.abs().mean())
    net.save(root / "net")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def whiten(capsys, work: Path, *argv) -> dict:
    """`pylandmark whiten ... --json` on the tiny network; returns the JSON."""
    code, out, err = run(capsys, "whiten", *argv, "--weights", work / "net", "--image-size", SIZE, "--quiet",
                         "--json")
    assert code == 0 and err == "", err  # no warning either
    return json.loads(out)


def db_paths(work: Path) -> list[Path]:
    """The photos of db/ in LabelledFolder's order (by landmark, then name): sorted paths."""
    return sorted((work / "db").rglob("*.png"))


def all_pairs(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (i, j), i != j, of photos in the same landmark folder."""
    labels = [p.parent.name for p in paths]
    pairs = [(i, j) for i in range(len(paths)) for j in range(len(paths)) if i != j and labels[i] == labels[j]]
    q, p = np.array(pairs).T
    return q, p


def net_of(work: Path) -> LandmarkNet:
    return LandmarkNet.from_pretrained(work / "net")


@pytest.fixture(scope="module")
def rows(work) -> np.ndarray:
    """(N, D) float64 of the float16 descriptors the commands learn from: the photos of db/ by
    extract, in the command's batches of 16 (deterministic on the CPU: the same rows)."""
    return plm.extract(net_of(work), db_paths(work), image_size=SIZE, batch_size=16, progress=False).astype(np.float64)


# ---- references (float64, from the definitions) ----------------------------------------------

def lw_reference(x: np.ndarray, q: np.ndarray, p: np.ndarray):
    """Learned whitening as Radenovic et al. define it (test_whiten.reference_lw: m the mean of
    the query descriptors, P = E^T S^-1/2), with the whitened covariance's eigenvalues and cond(S)."""
    from test_whiten import reference_lw

    m, proj, s, lam = reference_lw(x, q, p)
    vals = np.linalg.eigvalsh(s)
    return m, proj, lam, vals.max() / vals.min()


def pca_reference(x: np.ndarray):
    """PCA whitening: m the mean, P = Lambda^-1/2 E^T from the covariance's eigen-decomposition
    (decreasing eigenvalues). Returns m, P and the eigenvalues."""
    m = x.mean(axis=0)
    lam, e = np.linalg.eigh((x - m).T @ (x - m) / len(x))
    order = np.argsort(lam)[::-1]
    return m, np.diag(lam[order] ** -0.5) @ e[:, order].T, lam[order]


def gaps(lam: np.ndarray) -> np.ndarray:
    """Each eigenvalue's distance to the nearest other one."""
    d = np.abs(lam[:, None] - lam[None, :]) + np.diag(np.full(len(lam), np.inf))
    return d.min(axis=1)


def assert_rows_match(got: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> None:
    """Each row of got equals ref's up to its sign (eigenvectors are defined up to sign; the
    library fixes signs by its own rule, in its own basis), relative to the row's norm."""
    assert got.shape == ref.shape
    signs = np.sign(np.sum(got * ref, axis=1, keepdims=True))
    rel = np.linalg.norm(got * signs - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert (rel <= tol).all(), f"row errors {rel.max():.3g} over tolerances {tol[np.argmax(rel - tol)]:.3g}"


def lw_tolerance(lam: np.ndarray, cond_s: float) -> np.ndarray:
    """Per-row relative tolerance of two float64 computations of Lw from the same descriptors.
    Both whitening factors of S (L^-1 and S^-1/2; backward-stable factorisations, then an
    inverse) carry a relative error of about D u cond(S), which perturbs the whitened covariance
    by as much relative to its norm lam[0]; by Davis-Kahan an eigenvector moves by at most that
    perturbation over its eigenvalue's gap. A row of P is off by the factor's error plus that
    angle; 4x for the first-order analysis."""
    e = D * U64 * cond_s
    return 4 * e * (1 + lam[0] / gaps(lam))


def pca_tolerance(lam: np.ndarray) -> np.ndarray:
    """Per-row relative tolerance of two float64 PCA whitenings of the same descriptors:
    eigenvalues off by D u lam[0] (so lam^-1/2 by half that over lam_i), eigenvectors by
    D u lam[0] / gap_i (Davis-Kahan); 4x for the first-order analysis."""
    return 4 * D * U64 * lam[0] * (1 / lam + 1 / gaps(lam))


def f32_rows(net: LandmarkNet, paths: list[Path], batch_size: int = 16) -> np.ndarray:
    """The float32 descriptors extract computes for the photos before it whitens them and rounds
    to float16: its inference copy of the network, on the same batches (bit for bit; those rows
    are checked against an eager forward pass in test_extraction)."""
    inference = prepare_inference_model(net, torch.device("cpu"))
    out = [describe_batch(inference, torch.stack([load_image(p, SIZE) for p in paths[i:i + batch_size]]), (1.0,))
           for i in range(0, len(paths), batch_size)]
    return torch.cat(out).double().numpy()


def whitened(v: np.ndarray, w: Whitening) -> np.ndarray:
    """L2N(P (v - m)) in float64, L2N as pylandmark defines it (y / (|y| + 1e-6))."""
    y = (v - w.mean) @ w.projection.T
    return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-6)


def sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ---- learning -------------------------------------------------------------------------------

def test_lw_from_landmark_folders_matches_the_definition(work, rows, capsys):
    res = whiten(capsys, work, work / "db", "--pairs-from-folders", "--out", work / "lw.safetensors")
    paths = db_paths(work)
    q, p = all_pairs(paths)
    assert res == {"out": str(work / "lw.safetensors"), "kind": "lw", "images": N, "descriptors": N,
                   "pairs": len(q), "dim": D, "out_dim": D, "skipped": [], "install": None}
    w = Whitening.load(work / "lw.safetensors")
    assert w.kind == "lw" and w.projection.shape == (D, D)
    # The reference describes the photos with the same extract call the command makes (same
    # network, size and batches of 16, deterministic on the CPU): the same float16 rows, so the
    # rounding of float32 extraction is common to both sides and cancels (the smallest
    # directions of S are near the float16 spacing of the rows: any other description of the
    # photos gives another whitening there). What differs is float64 arithmetic: the mean sums
    # len(q) rows in another order (len(q) u max|x|), P as lw_tolerance says.
    x = rows
    m, proj, lam, cond_s = lw_reference(x, q, p)
    np.testing.assert_allclose(w.mean, m, rtol=0, atol=len(q) * U64 * np.abs(x).max())
    # weighted by (photos - 1) per landmark: not the plain mean of the rows
    assert np.abs(m - x.mean(axis=0)).max() > 1e3 * len(q) * U64
    assert cond_s < 1e6  # a well-posed test: S is far from singular
    assert_rows_match(w.projection, proj, lw_tolerance(lam, cond_s))


def test_pca_from_a_folder_of_photos_matches_the_definition(work, rows, capsys):
    """Without pairs the default is PCA, of every photo under the folders given (recursively);
    --dim keeps the leading rows; the text output is one line."""
    code, out, err = run(capsys, "whiten", work / "db", "--weights", work / "net", "--image-size", SIZE, "--quiet",
                         "--out", work / "pca.safetensors", "--dim", 20)
    assert code == 0, err
    assert out.count("\n") == 1 and f"pca whitening of {D}-d descriptors from {N} images" in out
    assert "keeping 20 dimensions" in out and str(work / "pca.safetensors") in out
    w = Whitening.load(work / "pca.safetensors")
    assert w.kind == "pca" and w.projection.shape == (20, D)
    # the same float16 rows as the command's (see the Lw test); float64 arithmetic only
    x = rows
    m, proj, lam = pca_reference(x)
    np.testing.assert_allclose(w.mean, m, rtol=0, atol=len(x) * U64 * np.abs(x).max())
    assert_rows_match(w.projection, proj[:20], pca_tolerance(lam)[:20])


def test_pairs_from_an_sfm120k_whitening_file(work, capsys, tmp_path):
    """--pairs DIR: the images and pairs of retrieval-SfM-120k-whiten.pkl."""
    from pylandmark.data import make_sfm_dataset
    from pylandmark.data.sfm120k import cid_to_path

    # 40 images of 5 scenes, each the query of one pair: differences span up to 35 > D dimensions
    root = make_sfm_dataset(tmp_path / "sfm", n_clusters=5, val_clusters=0, images_per_cluster=8, image_size=64,
                            seed=1)
    with open(root / "retrieval-SfM-120k-whiten.pkl", "rb") as f:  # our own file
        db = pickle.load(f)
    paths = [cid_to_path(root, c) for c in db["cids"]]
    for path in paths:  # one shape: extract then runs batches of 16, not one per shape
        with Image.open(path) as im:
            im = im.convert("RGB").resize((64, 48))
        im.save(path, format="JPEG", quality=90)
    q, p = np.array(db["qidxs"]), np.array(db["pidxs"])
    res = whiten(capsys, work, "--pairs", root, "--out", tmp_path / "sfm_lw.safetensors")
    assert (res["kind"], res["images"], res["descriptors"], res["pairs"]) == ("lw", len(paths), len(paths), len(q))
    w = Whitening.load(tmp_path / "sfm_lw.safetensors")
    x = plm.extract(net_of(work), paths, image_size=SIZE, batch_size=16, progress=False).astype(np.float64)
    m, proj, lam, cond_s = lw_reference(x, q, p)
    np.testing.assert_allclose(w.mean, m, rtol=0, atol=len(q) * U64 * np.abs(x).max())
    assert_rows_match(w.projection, proj, lw_tolerance(lam, cond_s))


# ---- using the file, installing it ----------------------------------------------------------

def test_the_file_whitens_extract_index_and_search(work, capsys):
    """--whitening FILE with the same --weights: extract gives the photos' descriptors whitened
    by the file; an index built with it answers searches with those descriptors' similarities."""
    lw = work / "lw_use.safetensors"
    whiten(capsys, work, work / "db", "--pairs-from-folders", "--out", lw)
    w = Whitening.load(lw)
    paths = db_paths(work)
    code, _, err = run(capsys, "extract", work / "db", "--weights", work / "net", "--image-size", SIZE, "--quiet",
                       "--whitening", lw, "--out", work / "white.npy")
    assert code == 0, err
    got = np.load(work / "white.npy")
    assert got.shape == (N, D)
    # extract whitens its float32 rows in float64, then rounds to float16: half a float16 spacing
    # from the float64 reference (which differs from extract's own float64 arithmetic by far less
    # than the 1e-9 allowed for it: D u64 |P| |v - m| / |y| ~ 1e-11)
    ref = whitened(f32_rows(net_of(work), paths), w)
    err_ = np.abs(got.astype(np.float64) - ref)
    bound = float16_bound(ref, 1e-9)
    assert (err_ <= bound).all(), f"max error {err_.max():.3g}, excess {(err_ - bound).max():.3g}"

    code, _, err = run(capsys, "index", "build", work / "db", "--labels-from-folders", "--weights", work / "net",
                       "--image-size", SIZE, "--quiet", "--whitening", lw, "--out", work / "white.plmi")
    assert code == 0, err
    queries = [paths[i] for i in (0, 11, 25, N - 1)]
    code, out, err = run(capsys, "search", work / "white.plmi", *queries, "--weights", work / "net", "--quiet",
                         "--whitening", lw, "-k", 5, "--json")
    assert code == 0, err
    results = json.loads(out)
    # the index holds extract's rows (the same describe); the scores are cosines of float16
    # rows summed in float32: within (D + 2) float32 ulps of the float64 cosine
    unit = got.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    tol = (D + 2) * 2.0 ** -24
    row_of = {str(p.resolve()): i for i, p in enumerate(paths)}
    for qpath, r in zip(queries, results):
        scores = unit @ unit[row_of[str(qpath.resolve())]]
        assert len(r["neighbours"]) == 5
        for hit in r["neighbours"]:
            assert abs(hit["score"] - scores[row_of[hit["path"]]]) <= tol
        assert r["neighbours"][0]["path"] == str(qpath.resolve())  # each photo finds itself
        fifth = np.sort(scores)[-5]  # the top 5, but for ties within the scores' tolerance
        assert all(scores[row_of[h["path"]]] >= fifth - 2 * tol for h in r["neighbours"])


def test_install_writes_a_new_model_directory(work, capsys, tmp_path):
    """--install NEW_DIR: the network with the whitening (--dim rows) as its whitening layer;
    its descriptors are the base descriptors whitened; --weights is left as it was; an existing
    directory is never written over."""
    before = sha(work / "net")
    res = whiten(capsys, work, work / "db", "--pairs-from-folders", "--dim", 16, "--out", tmp_path / "lw16.safetensors",
                 "--install", tmp_path / "installed")
    assert res["install"] == str(tmp_path / "installed") and res["out_dim"] == 16
    assert sha(work / "net") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["installed", "lw16.safetensors"]  # no temporary left
    w = Whitening.load(tmp_path / "lw16.safetensors")
    model = LandmarkNet.from_pretrained(tmp_path / "installed")
    assert model.whiten is not None and model.dim == 16
    paths = db_paths(work)[::5]
    got = plm.extract(model, paths, image_size=SIZE, progress=False).astype(np.float64)
    v = f32_rows(net_of(work), paths)  # the new network's own rows before its whitening layer
    ref = whitened(v, w)
    # The layer computes y = W v + b in float32 (W = P[:16] and b = -W m, each rounded to
    # float32): a length-(D + 1) dot product, off by gamma_(D+1) + 2u of (|W||v| + |b|) per
    # element (large: b cancels most of W v); an error e in y moves y / |y| by at most
    # 2 |e| / |y|; then rounding to float16 (half its spacing)
    u = 2.0 ** -24
    gamma = (D + 1) * u / (1 - (D + 1) * u)
    e = (gamma + 2 * u) * (np.abs(v) @ np.abs(w.projection).T + np.abs(w.projection @ w.mean))
    y = (v - w.mean) @ w.projection.T
    bound = float16_bound(ref, 2 * np.linalg.norm(e, axis=1, keepdims=True) / np.linalg.norm(y, axis=1, keepdims=True))
    err_ = np.abs(got - ref)
    assert (err_ <= bound).all(), f"max error {err_.max():.3g}, excess {(err_ - bound).max():.3g}"

    for target in (tmp_path / "installed", work / "net"):  # never over an existing model
        code, out, err = run(capsys, "whiten", work / "db", "--pairs-from-folders", "--weights", work / "net",
                             "--out", tmp_path / "again.safetensors", "--install", target, "--quiet")
        assert code == 2 and out == "" and err.count("\n") == 1 and "--install" in err, err
    assert sha(work / "net") == before and not (tmp_path / "again.safetensors").exists()


def test_a_network_with_a_whitening_layer(work, capsys, tmp_path):
    """Without --install the whitening is of the network's descriptors as extract gives them
    (after its whitening layer: what --whitening FILE applies to); with --install it is learned
    before that layer, which it replaces."""
    layered = install_whitening(net_of(work), Whitening(np.zeros(D), np.eye(D)[:16], "pca"))
    layered.save(tmp_path / "layered")
    common = [work / "db", "--pairs-from-folders", "--weights", tmp_path / "layered", "--image-size", SIZE,
              "--quiet", "--json"]
    code, out, err = run(capsys, "whiten", *common, "--kind", "pca", "--out", tmp_path / "post.safetensors")
    assert code == 0, err
    assert json.loads(out)["dim"] == 16 and Whitening.load(tmp_path / "post.safetensors").dim == 16
    code, _, err = run(capsys, "extract", work / "db", "--weights", tmp_path / "layered", "--image-size", SIZE,
                       "--quiet", "--whitening", tmp_path / "post.safetensors", "--out", tmp_path / "d.npy")
    assert code == 0, err
    assert np.load(tmp_path / "d.npy").shape == (N, 16)
    code, out, err = run(capsys, "whiten", *common, "--out", tmp_path / "inst.safetensors", "--install",
                         tmp_path / "replaced")
    assert code == 0, err
    assert json.loads(out)["dim"] == D
    replaced = LandmarkNet.from_pretrained(tmp_path / "replaced")
    assert replaced.dim == D
    # the new layer is the file's whitening (weight P, bias -P m, rounded to float32)
    w = Whitening.load(tmp_path / "inst.safetensors")
    assert replaced.whiten is not None
    np.testing.assert_array_equal(replaced.whiten.weight.detach().numpy(), w.projection.astype(np.float32))
    np.testing.assert_array_equal(replaced.whiten.bias.detach().numpy(), (-w.projection @ w.mean).astype(np.float32))


# ---- bad input ------------------------------------------------------------------------------

def test_unreadable_images_fail_or_are_skipped(work, rows, capsys, tmp_path):
    """An unreadable photo: exit 2 and one line naming it and --skip-bad; with --skip-bad it is
    left out with the pairs that hold it, which gives the whitening of the other photos."""
    import shutil

    shutil.copytree(work / "db", tmp_path / "db")
    # the last photo (after the 43 readable ones, which keep their batches of 16)
    (tmp_path / "db" / "l09" / "zz_broken.png").write_bytes(b"not a png")
    args = ["--pairs-from-folders", "--weights", work / "net", "--image-size", SIZE, "--quiet"]
    code, out, err = run(capsys, "whiten", tmp_path / "db", *args, "--out", tmp_path / "bad.safetensors")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "zz_broken.png" in err and "--skip-bad" in err
    assert not (tmp_path / "bad.safetensors").exists()
    code, out, err = run(capsys, "whiten", tmp_path / "db", *args, "--skip-bad", "--json", "--out",
                         tmp_path / "skipped.safetensors")
    assert code == 0, err
    res = json.loads(out)
    paths = db_paths(work)
    q, p = all_pairs(paths)
    assert (res["images"], res["descriptors"], res["pairs"]) == (N + 1, N, len(q))
    assert len(res["skipped"]) == 1 and "zz_broken.png" in res["skipped"][0]
    # the readable photos in the same batches: the same rows, so the clean folder's reference holds
    w = Whitening.load(tmp_path / "skipped.safetensors")
    x = rows
    m, proj, lam, cond_s = lw_reference(x, q, p)
    np.testing.assert_allclose(w.mean, m, rtol=0, atol=len(q) * U64 * np.abs(x).max())
    assert_rows_match(w.projection, proj, lw_tolerance(lam, cond_s))


def test_too_few_photos_per_landmark_warn(work, capsys, tmp_path):
    """8 photos of 2 landmarks: their pair differences span 6 of the 24 dimensions; the
    regularised whitening is written, with one warning that says why it means little."""
    import shutil

    for c in ("l00", "l01"):
        shutil.copytree(work / "db" / c, tmp_path / "few" / c, dirs_exist_ok=True)
    shutil.copy(work / "db" / "l02" / "im0.png", tmp_path / "few" / "l01" / "extra.png")
    code, out, err = run(capsys, "whiten", tmp_path / "few", "--pairs-from-folders", "--weights", work / "net",
                         "--image-size", SIZE, "--quiet", "--out", tmp_path / "few.safetensors")
    assert code == 0 and "from 8 images" in out
    assert err.count("\n") == 1 and "pylandmark: warning: the matching pairs tie 8 images into 2 groups" in err, err
    assert Whitening.load(tmp_path / "few.safetensors").kind == "lw"


@pytest.mark.parametrize("case", ["one image", "no pairs", "dim too large", "lw without pairs", "pairs and images",
                                  "no pairs file", "out is a folder", "two folders"])
def test_bad_input_is_one_line_and_exit_2(work, capsys, tmp_path, case):
    db, single, one = work / "db", work / "single", work / "db" / "l00" / "im0.png"
    argv, names = {
        "one image": ([one], "IMAGES"),
        "no pairs": ([single, "--pairs-from-folders"], "--pairs-from-folders"),
        "dim too large": ([db, "--pairs-from-folders", "--dim", D + 1], "--dim"),
        "lw without pairs": ([db, "--kind", "lw"], "--kind"),
        "pairs and images": ([db, "--pairs", work], "--pairs"),
        "no pairs file": (["--pairs", work], "--pairs"),
        "out is a folder": ([db, "--out", tmp_path], "--out"),
        "two folders": ([db, single, "--pairs-from-folders"], "--pairs-from-folders"),
    }[case]
    if "--out" not in argv:
        argv = [*argv, "--out", tmp_path / "w.safetensors"]
    code, out, err = run(capsys, "whiten", *argv, "--weights", work / "net", "--image-size", SIZE, "--quiet")
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("pylandmark whiten: error: ") and names in err, err
    assert not (tmp_path / "w.safetensors").exists()
