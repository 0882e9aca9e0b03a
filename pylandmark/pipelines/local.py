"""The `pylandmark` commands in one process: describe, build and grow an index, search,
recognise, evaluate on revisited Oxford/Paris. :mod:`.torchrun` has the same jobs (same names,
arguments and results) for a torchrun launch; the CLI picks one of the two modules once."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_image_size, check_scales
from .._files import writer_lock
from ..extraction import ExtractOptions, describe
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
    for message in found:
        warnings.warn(message, stacklevel=2)
    return found


def search_images(index: Index, network, images: Sequence[Path], opts: ExtractOptions, k: int = 5) -> list[dict]:
    """For each query image: its top-k neighbours (score, id, label, path)."""
    desc, _, _ = describe(network, images, opts)
    return search_results(index, desc, [str(p) for p in images], k=k)


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
                     vote: str = "majority", min_score: float | None = None) -> list[dict]:
    """For each query image: the recognised label, its confidence and the neighbours that voted."""
    if index.labels is None:
        raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
    desc, _, _ = describe(network, images, opts)
    out = recognition_results(index, desc, [str(p) for p in images], k=k, vote=vote, min_score=min_score)
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
