"""The `pylandmark` commands in one process: describe, build and grow an index, search,
recognise, evaluate on revisited Oxford/Paris. :mod:`.torchrun` has the same jobs (same names,
arguments and results) for a torchrun launch; the CLI picks one of the two modules once."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_image_size, check_scales
from .._files import writer_lock
from ..extraction import ExtractOptions, describe
from ..models.pooling import Pooling
from ..retrieval.index import Index, IndexChangedError, IndexLike
from .files import expand_images, save_descriptors, stored_paths

log = logging.getLogger(__name__)

def build_index(network, folder: str | Path, opts: ExtractOptions, *, labels_from_folders: bool = True,
                weights: str = "") -> tuple[Index, list[str]]:
    """An index of every image under `folder`; with labels_from_folders, <folder>/<class>/... names
    each image's label. Unreadable images are skipped and reported."""
    from ..data.folders import LabelledFolder

    if labels_from_folders:
        ds = LabelledFolder(folder)
        paths, labels = [Path(p) for p in ds.paths], list(ds.labels)
    else:
        paths, labels = expand_images([folder]), None
    desc, kept, skipped = describe(network, paths, opts, skip_bad=True)
    if labels is not None:
        keep = set(map(str, kept))
        labels = [lab for p, lab in zip(paths, labels) if str(p) in keep]
    index = Index(int(desc.shape[1]), metadata={"weights": weights, **opts.metadata()})
    index.add(desc, labels=labels, paths=stored_paths(kept))
    return index, skipped


def add_images(index: Index, network, images: Sequence[Path], opts: ExtractOptions,
               label: str | None = None, labels_from_folders: bool = False) -> tuple[np.ndarray, list[str]]:
    """Describes and appends images; the label is one for all, or each image's parent folder."""
    desc, labels, paths, skipped = _new_rows(network, images, opts, label, labels_from_folders)
    return index.add(desc, labels=labels, paths=paths), skipped


def _new_rows(network, images: Sequence[Path], opts: ExtractOptions, label: str | None,
              labels_from_folders: bool) -> tuple[np.ndarray, list | None, list[str], list[str]]:
    """(descriptors, labels, stored paths, skipped) of the images to add (unreadable ones skipped)."""
    desc, kept, skipped = describe(network, images, opts, skip_bad=True)
    labels = None
    if labels_from_folders:
        labels = [p.parent.name for p in kept]
    elif label is not None:
        labels = [label] * len(kept)
    return desc, labels, stored_paths(kept), skipped


def network_weights(weights: str | None, index: Any = None) -> str:
    """The network to describe images with: ``weights`` when given, else the one ``index``
    records (a preset name or a local path). The CLI and the service decide it here.

    Raises:
        ValueError: (one line) nothing given and nothing recorded; or the index names its network
            by URL: an index file may come from anyone, and never makes pylandmark download
            anything without an explicit ``--weights``.
    """
    if weights:
        return weights
    value = None if index is None else index.metadata.get("weights")
    if not isinstance(value, str) or not value:
        raise ValueError("--weights is required (a directory from `pylandmark train`, a checkpoint file or URL, "
                         "a preset name, or 'random' for a smoke test)"
                         + ("" if index is None else "; the index does not say which network built it"))
    if "://" in value:
        raise ValueError(f"the index names its network by URL ({value[:200]}); an index never makes pylandmark "
                         "download anything: pass --weights (that URL, if you trust it, or a local copy)")
    return value


def index_options(index: Index, **overrides: Any) -> ExtractOptions:
    """Extraction options recorded in the index, with explicit overrides (None = keep). An index
    may come from elsewhere: what it records is checked before anything runs on it."""
    meta = index.metadata
    opts = ExtractOptions()
    if overrides.get("image_size") is None:
        opts.image_size = check_image_size(meta.get("image_size", 1024), "the index's image_size",
                                           hint="; pass --image-size")
    if overrides.get("scales") is None:
        scales = meta.get("scales", [1.0])
        if not isinstance(scales, list):
            raise ValueError(f"the index records scales {scales!r:.60}, expected a list of numbers")
        opts.scales = check_scales(scales, "the index's scales")
    if overrides.get("whitening") is None:
        whitening = meta.get("whitening")
        if whitening is not None and (not isinstance(whitening, str) or len(whitening) > 200):
            raise ValueError(f"the index records whitening {whitening!r:.60}, expected a name; pass --whitening")
        opts.whitening = whitening or None
    if overrides.get("pooling") is None:
        opts.pooling = str(Pooling.parse(meta.get("pooling", "gem"), "the index's pooling"))
    for key, value in overrides.items():
        if value is not None:
            setattr(opts, key, tuple(value) if key == "scales" else value)
    return opts


def check_against_index(index: Index, weights: str | None, opts: ExtractOptions) -> list[str]:
    """Warns (once per mismatch) when queries would be described differently from the index's
    own images: other weights, image size or scales make the scores meaningless. Returns the
    warnings."""
    import warnings

    meta = index.metadata
    found = []
    if weights and meta.get("weights") and str(weights) != str(meta["weights"]):
        found.append(f"--weights {weights} differs from the weights this index was built with "
                     f"({meta['weights']}); descriptors of different networks are not comparable")
    if "image_size" in meta and int(meta["image_size"]) != opts.image_size:
        found.append(f"--image-size {opts.image_size} differs from the index's {meta['image_size']}")
    if "scales" in meta and tuple(float(s) for s in meta["scales"]) != tuple(float(s) for s in opts.scales):
        found.append(f"scales {list(opts.scales)} differ from the index's {list(meta['scales'])}")
    recorded, pooling = Pooling.parse(meta.get("pooling", "gem"), "the index's pooling"), Pooling.parse(opts.pooling)
    if recorded != pooling:
        found.append(f"--pooling {pooling} differs from the index's {recorded}")
    for message in found:
        warnings.warn(message, stacklevel=2)
    return found


def search_images(index: Index, network, images: Sequence[Path], opts: ExtractOptions, k: int = 5,
                  superglobal: Mapping[str, Any] | None = None) -> list[dict]:
    """For each query image: its top-k neighbours (score, id, label, path); with
    ``superglobal`` (:func:`reranked`) its top M re-ranked first."""
    desc, _, _ = describe(network, images, opts)
    return search_results(reranked(index, superglobal), desc, [str(p) for p in images], k=k)


def reranked(index: Any, superglobal: Mapping[str, Any] | None) -> Any:
    """``index``, or with ``superglobal`` (keyword arguments of
    :class:`~pylandmark.retrieval.rerank.SuperGlobalView`: m, neighbours, beta) the view of it
    whose searches re-rank their top M."""
    if superglobal is None:
        return index
    from ..retrieval.rerank import SuperGlobalView

    return SuperGlobalView(index, **superglobal)


def search_results(index: IndexLike, desc: np.ndarray, queries: Sequence[str], k: int = 5) -> list[dict]:
    """The JSON of `pylandmark search --json` for (Q, D) query descriptors named `queries`
    (index: an Index, or a view with its labels, paths, ids and search_rows)."""
    scores, rows = index.search_rows(desc, k=k)
    labels, paths, ids = index.labels, index.paths, index.ids
    out = []
    for name, srow, rrow in zip(queries, np.asarray(scores), np.asarray(rows)):
        hits = [{"rank": r + 1, "score": float(s), "id": int(ids[i]),
                 "label": None if labels is None else json_value(labels[i]),
                 "path": None if paths is None else paths[i]}
                for r, (s, i) in enumerate(zip(srow, rrow)) if i >= 0]
        out.append({"query": str(name), "neighbours": hits})
    return out


def recognize_images(index: Index, network, images: Sequence[Path], opts: ExtractOptions, k: int = 5,
                     vote: str = "majority", min_score: float | None = None,
                     superglobal: Mapping[str, Any] | None = None) -> list[dict]:
    """For each query image: the recognised label, its confidence and the neighbours that voted
    (with ``superglobal``, the top k after the re-ranking, :func:`reranked`)."""
    if index.labels is None:
        raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
    desc, _, _ = describe(network, images, opts)
    out = recognition_results(reranked(index, superglobal), desc, [str(p) for p in images], k=k, vote=vote,
                              min_score=min_score)
    truth = folder_truth(images, index.labels)
    if truth is not None:
        for r, label in zip(out, truth):
            r["truth"] = label
    return out


def recognition_results(index: IndexLike, desc: np.ndarray, queries: Sequence[str], k: int = 5,
                        vote: str = "majority", min_score: float | None = None) -> list[dict]:
    """The JSON of `pylandmark recognize --json` for (Q, D) query descriptors named `queries`
    (index: an Index, or a view with its labels, paths and ids)."""
    from ..retrieval.recognition import recognize

    if index.labels is None:
        raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
    res = recognize(index, desc, k=k, vote=vote, min_score=min_score)
    paths, ids = index.paths, index.ids
    out = []
    for q, name in enumerate(queries):
        hits = [{"score": float(res.scores[q, j]), "id": int(ids[r]), "label": json_value(res.neighbor_labels[q, j]),
                 "path": None if paths is None else paths[r]}
                for j, r in enumerate(res.neighbors[q]) if r >= 0]
        out.append({"query": str(name), "label": json_value(res.labels[q]), "known": bool(res.known[q]),
                    "confidence": float(res.confidences[q]), "votes": int(res.votes[q]), "neighbours": hits})
    return out


def folder_truth(images: Sequence[Path], index_labels: Any) -> list[Any] | None:
    """The true labels of query images that sit in class folders (``<dir>/<label>/<image>``
    with every parent folder name one of the index's labels), else None."""
    known = {str(lab): lab for lab in index_labels}
    parents = [Path(p).parent.name for p in images]
    if not parents or any(name not in known for name in parents):
        return None
    return [json_value(known[name]) for name in parents]


def recognition_summary(results: Sequence[dict]) -> dict | None:
    """Accuracy, per-class counts and the confusion of recognize_images results that carry a
    ``truth`` label (None when they do not): the table when there are few classes, else the
    most confused pairs (:func:`pylandmark.evaluate.confusion_summary`)."""
    from ..evaluate import accuracy, confusion_summary

    if not results or any("truth" not in r for r in results):
        return None
    predicted = [r["label"] for r in results]
    truth = [r["truth"] for r in results]
    summary = confusion_summary(predicted, truth)
    return {"accuracy": accuracy(predicted, truth), "right": sum(a == b for a, b in zip(predicted, truth)),
            "queries": len(results), "per_class": summary["per_class"], "classes": [str(c) for c in summary["classes"]],
            "confusion": summary["confusion"], "confused_pairs": [[str(a), str(b), n]
                                                                  for a, b, n in summary["confused_pairs"]]}


def json_value(v: Any) -> Any:
    """A label as JSON holds it: numpy scalars become Python ones."""
    return v.item() if isinstance(v, np.generic) else v


# ---- the jobs the CLI runs (the same names and results as in .torchrun) --------------------

def open_index(path: str | Path, device: Any = None) -> Any:
    """The index at ``path`` (a single file or a manifest), memory-mapped; ``device`` is for
    torchrun's sharded index and unused here."""
    return Index.load(path)


def extract_to_file(network, images: Sequence[Path], opts: ExtractOptions, out: str | Path, *,
                    skip_bad: bool = False) -> dict:
    """``pylandmark extract``: the (N, D) float16 ``.npy`` and its ``.paths.txt`` listing.
    Returns ``{"out", "paths" (the two files), "count", "dim", "skipped"}``."""
    desc, kept, skipped = describe(network, images, opts, skip_bad=skip_bad)
    target, listing = save_descriptors(out, desc, kept)
    return {"out": target, "paths": listing, "count": len(kept), "dim": int(desc.shape[1]), "skipped": skipped}


def build_index_file(network, folder: str | Path, opts: ExtractOptions, out: str | Path, *,
                     labels_from_folders: bool = True, weights: str = "") -> dict:
    """``pylandmark index build``: the index file at ``out`` (shards of an earlier torchrun
    build at that path are removed). Returns ``{"index", "skipped"}``."""
    from ..retrieval.manifest import remove_stale_shards

    index, skipped = build_index(network, folder, opts, labels_from_folders=labels_from_folders, weights=weights)
    index.save(out)
    remove_stale_shards(out)
    return {"index": index, "skipped": skipped}


def add_to_index_file(index_path: str | Path, network, images: Sequence[Path], opts: ExtractOptions, *,
                      label: str | None = None, labels_from_folders: bool = False) -> dict:
    """``pylandmark index add``: appends the images to the index file (a sharded index gets
    a new shard, :func:`.shards.add_images`). Returns ``{"added", "count", "skipped"}``."""
    from ..retrieval.format import is_manifest

    if is_manifest(index_path):
        from .shards import add_images as add_shard

        return add_shard(index_path, network, images, opts, label=label, labels_from_folders=labels_from_folders)
    # describe first (the long part), then append to the index as it is now, holding the
    # writers' lock from reading it to the rename: concurrent adders queue, and none loses rows
    desc, labels, paths, skipped = _new_rows(network, images, opts, label, labels_from_folders)
    with writer_lock(index_path):
        if is_manifest(index_path):  # another writer made it sharded meanwhile
            raise IndexChangedError(f"{index_path} became a sharded index while the images were described; "
                                    "run the add again")
        index = Index.load(index_path, mmap=False)
        ids = index.add(desc, labels=labels, paths=paths)
        index.save(index_path)
    return {"added": len(ids), "count": len(index), "skipped": skipped}


def add_codes_to_index_file(index_path: str | Path) -> dict:
    """``pylandmark index codes``: stores the compact codes that CPU searches scan first
    (:func:`pylandmark.prepare`) in an index file written before format version 2; a file that
    has them is left as it is. Returns ``{"count", "updated"}``."""
    from ..retrieval.format import is_manifest

    if is_manifest(index_path):
        raise ValueError(f"{index_path} is a shard manifest: shards written by this version hold codes, and older "
                         "shards get them in memory on their first search; run `pylandmark index codes` on an "
                         "index file")
    with writer_lock(index_path):  # the load and the save see one version; concurrent writers queue
        index = Index.load(index_path)
        updated = not index.info()["codes"]
        if updated:
            index.save(index_path)
    return {"count": len(index), "updated": updated}


def evaluate_revisited(network, names: Sequence[str], data_root: str | Path, opts: ExtractOptions,
                       **kwargs: Any) -> dict:
    """``pylandmark evaluate``: :func:`pylandmark.evaluate.protocol.evaluate_revisited` (mAP and
    mP@k, easy / medium / hard, per dataset; with ``keep_ranks`` the (Q, N) ranking too)."""
    from ..evaluate.protocol import evaluate_revisited as run

    return run(network, names, data_root, opts, **kwargs)


# ---- pylandmark whiten (one process) -----------------------------------------------------------

#: pairs per image drawn from landmark folders (:func:`pylandmark.data.labelled.same_label_pairs`)
WHITEN_POSITIVES = 5


def whitening_inputs(inputs: Sequence[str | Path], *, pairs_from_folders: bool = False,
                     pairs: str | Path | None = None) -> tuple[list[Path], np.ndarray | None, np.ndarray | None]:
    """The images ``pylandmark whiten`` learns from, and their matching pairs.

    Args:
        inputs: image files and folders (searched recursively); with ``pairs_from_folders`` the
            one folder of landmark folders (``<folder>/<landmark>/<image>``: each image paired
            with up to :data:`WHITEN_POSITIVES` others of its landmark, seed 0); with ``pairs``
            none.
        pairs: a folder holding SfM-120k whitening pairs (``retrieval-SfM-120k-whiten.pkl`` or
            ``retrieval-SfM-30k-whiten.pkl``, or in ``dbs/``) and the ``ims/`` they name.

    Returns:
        ``(images, qidxs, pidxs)``: at least 2 image paths, and (P,) int64 indices into them of
        the matching pairs (None, None without pairs).
    """
    qidxs = pidxs = None
    if pairs is not None:
        from ..data.sfm120k import WHITEN_NAMES, WhiteningPairs

        if inputs:
            raise ValueError(f"--pairs: the images are the ones {WHITEN_NAMES[0]}.pkl names (under DIR/ims); "
                             f"give no IMAGES (got {len(inputs)})")
        root = Path(pairs).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--pairs: {root} is not a folder; give the folder holding "
                                    f"{WHITEN_NAMES[0]}.pkl and ims/")
        for name in WHITEN_NAMES:
            try:
                found = WhiteningPairs(root, name)
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(f"--pairs: no {' or '.join(n + '.pkl' for n in WHITEN_NAMES)} in {root} "
                                    f"(nor in {root / 'dbs'})")
        images, qidxs, pidxs = found.images, found.qidxs, found.pidxs
    elif pairs_from_folders:
        from ..data.folders import LabelledFolder
        from ..data.labelled import same_label_pairs

        if len(inputs) != 1:
            raise ValueError(f"--pairs-from-folders: give one folder of landmark folders (FOLDER/<landmark>/<image>), "
                             f"got {len(inputs)} IMAGES")
        ds = LabelledFolder(inputs[0])
        images = [Path(p) for p in ds.paths]
        qidxs, pidxs = same_label_pairs(np.asarray(ds.targets), positives=WHITEN_POSITIVES, seed=0)
        if qidxs.size == 0:
            raise ValueError(f"--pairs-from-folders: no landmark folder under {inputs[0]} holds 2 or more images, so "
                             "there is no matching pair; add photos of the same landmarks, or use --kind pca")
    else:
        if not inputs:
            raise ValueError("IMAGES: give image files or folders (or --pairs DIR)")
        images = expand_images(inputs)
    if len(images) < 2:
        raise ValueError(f"IMAGES: a whitening is learned from at least 2 images, got {len(images)}")
    return images, qidxs, pidxs


def whiten_to_file(network, images: Sequence[Path], opts: ExtractOptions, out: str | Path, *,
                   qidxs: Any = None, pidxs: Any = None, kind: str | None = None, dim: int | None = None,
                   install: str | Path | None = None, skip_bad: bool = False) -> dict:
    """``pylandmark whiten``: learns a whitening of ``network``'s descriptors of ``images``
    (:func:`pylandmark.extraction.compute_whitening`) and writes it to ``out``
    (:meth:`~pylandmark.nn.whiten.Whitening.save`): what ``--whitening FILE`` applies to the
    descriptors of the same network.

    Args:
        qidxs, pidxs: the matching pairs (:func:`whitening_inputs`), or None.
        kind: "lw" (needs the pairs), "pca", or None: "lw" with pairs, else "pca".
        dim: output dimensions kept (the first rows of the projection; default all).
        install: also write a new model directory there (it must not exist, or be an empty
            folder): ``network`` with the whitening as its whitening layer. The whitening is then
            learned from the descriptors before ``network``'s own whitening layer, which it
            replaces (without one, those are its descriptors); the network's precomputed
            post-hoc whitenings, made for its old descriptors, are left behind. ``network``'s
            files are never touched.
        skip_bad: leave unreadable images (and the pairs holding one) out instead of failing.

    Returns:
        ``{"out", "kind", "images", "descriptors", "pairs", "dim", "out_dim", "skipped",
        "install"}``: ``descriptors`` the images described, ``pairs`` those learned from (None for
        PCA), ``dim`` the descriptor size, ``out_dim`` the whitened size.
    """
    from ..data.images import ImageLoadError
    from ..extraction import compute_whitening
    from ..models.whitening import install_whitening
    from ..nn.whiten import Whitening

    images = list(images)
    kind = kind or ("lw" if qidxs is not None else "pca")
    if kind == "lw" and qidxs is None:
        raise ValueError("--kind lw learns from matching pairs: pass --pairs-from-folders (a folder of landmark "
                         "folders) or --pairs DIR (SfM-120k whitening pairs), or use --kind pca")
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; name the file to write, e.g. {out / 'lw.safetensors'}")
    target = None if install is None else _new_model_dir(install)
    strip = target is not None
    size = int(network.backbone.num_features if strip else network.dim)
    if dim is not None and dim > size:
        raise ValueError(f"--dim {dim} is larger than the {size}-d descriptors; give at most {size}")
    if kind == "lw":
        images_in_pairs, groups = _pair_groups(qidxs, pidxs)
        if images_in_pairs - groups < size:
            warnings.warn(f"the matching pairs tie {images_in_pairs} images into {groups} groups: their differences "
                          f"span at most {images_in_pairs - groups} of the {size} dimensions, so their covariance is "
                          "singular and gets regularised (the whitening of the other directions means little); "
                          "learn from more photos of each landmark", stacklevel=2)
    pairs = (qidxs, pidxs) if kind == "lw" else (None, None)
    try:
        res = compute_whitening(network, images, kind, qidxs=pairs[0], pidxs=pairs[1], image_size=opts.image_size,
                                scales=opts.scales, batch_size=opts.batch_size, num_workers=opts.num_workers,
                                device=opts.device, amp=opts.amp, progress=opts.progress, strip=strip,
                                on_error="skip" if skip_bad else "raise", pooling=opts.pooling)
    except (ImageLoadError, FileNotFoundError) as err:
        raise type(err)(f"{err}; pass --skip-bad to leave unreadable images out") from err
    w, failures = res if skip_bad else (res, [])
    if dim is not None:
        w = Whitening(w.mean, w.projection[:dim], w.kind)
    w.save(out)
    if target is not None:
        _save_model_dir(install_whitening(network, w), target)
    bad = np.zeros(len(images), dtype=bool)
    bad[[f.index for f in failures]] = True
    used = None if kind != "lw" else int((~(bad[np.asarray(qidxs)] | bad[np.asarray(pidxs)])).sum())
    return {"out": out, "kind": kind, "images": len(images), "descriptors": int((~bad).sum()), "pairs": used,
            "dim": size, "out_dim": int(w.projection.shape[0]),
            "skipped": [f"{f.source}: {f.message}" for f in failures], "install": target}


def _pair_groups(qidxs: Any, pidxs: Any) -> tuple[int, int]:
    """(images in the pairs, connected groups they form): the pair differences span at most
    images - groups dimensions, a bound on the rank of Lw's pair covariance."""
    from ..data.colmap import connected_components

    ends = np.concatenate([np.asarray(qidxs), np.asarray(pidxs)]).astype(np.int64)
    nodes, edges = np.unique(ends, return_inverse=True)
    a, b = np.split(edges.ravel(), 2)
    groups = connected_components(nodes.size, a, b)
    return int(nodes.size), int(groups.max()) + 1 if groups.size else 0


def _new_model_dir(path: str | Path) -> Path:
    """``--install``'s directory: a path that does not exist yet, or an empty folder."""
    p = Path(path).expanduser()
    if p.exists() and not (p.is_dir() and not any(p.iterdir())):
        raise FileExistsError(f"--install {p} already exists; name a new directory (a model is never overwritten)")
    return p


def _save_model_dir(model: Any, target: Path) -> None:
    """``model.save`` into a temporary folder next to ``target``, renamed to ``target`` when
    complete: the directory appears whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        model.save(tmp)
        if target.is_dir():
            target.rmdir()  # the empty folder _new_model_dir accepted (not empty by now: an error)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
