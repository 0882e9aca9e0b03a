"""End-to-end pipelines from image files: describe, build and grow an index, search, recognise,
evaluate on revisited Oxford/Paris. Each `pylandmark` sub-command calls one function here."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .retrieval.index import Index

log = logging.getLogger(__name__)

MAX_IMAGE_SIZE = 16384  # longer image side recorded in an index (the paper uses 1024)


@dataclass
class ExtractOptions:
    """How images become descriptors (kept in an index's metadata so later queries match)."""

    image_size: int = 1024
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = 16
    num_workers: int = 0
    device: str = "cpu"
    progress: bool = True
    whitening: str | None = None  # a whitening the network holds, or a Whitening.save() file

    def metadata(self) -> dict:
        return {"image_size": self.image_size, "scales": list(self.scales), "whitening": self.whitening}


def expand_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and image files found under folders (sorted); errors on missing paths."""
    from .data.images import list_images

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileNotFoundError(f"no images (.jpg, .png, ...) under {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not out:
        raise ValueError("no images given")
    return out


def describe(network, images: Sequence[Path], opts: ExtractOptions, *, skip_bad: bool = False,
             bboxes: Sequence[Any] | None = None) -> tuple[np.ndarray, list[Path], list[str]]:
    """(N, D) float16 descriptors of the images that could be read, their paths, and one message
    per skipped image (empty unless skip_bad; extraction warns once about them). Raises
    ValueError when no image at all could be read."""
    from .extraction import extract

    result = extract(network, [str(p) for p in images], image_size=opts.image_size, scales=opts.scales,
                     bboxes=bboxes, batch_size=opts.batch_size, num_workers=opts.num_workers,
                     device=opts.device, progress=opts.progress, on_error="skip" if skip_bad else "raise",
                     whitening=opts.whitening)
    if not skip_bad:
        return result, list(images), []
    desc, failures = result
    bad = {f.index for f in failures}
    kept = [p for i, p in enumerate(images) if i not in bad]
    if not kept:  # nothing useful: an error, not an empty result
        raise ValueError(f"none of the {len(images)} images could be read (first: {failures[0].source}: "
                         f"{failures[0].message})")
    return desc, kept, [f"{f.source}: {f.message}" for f in failures]


def build_index(network, folder: str | Path, opts: ExtractOptions, *, labels_from_folders: bool = True,
                weights: str = "") -> tuple[Index, list[str]]:
    """An index of every image under `folder`; with labels_from_folders, <folder>/<class>/... names
    each image's label. Unreadable images are skipped and reported."""
    from .data.folders import LabelledFolder

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


def stored_paths(paths: Sequence[Path]) -> list[str]:
    """Image paths as an index stores them: absolute, so they resolve from any directory."""
    return [str(Path(p).resolve()) for p in paths]


def add_images(index: Index, network, images: Sequence[Path], opts: ExtractOptions,
               label: str | None = None, labels_from_folders: bool = False) -> tuple[np.ndarray, list[str]]:
    """Describes and appends images; the label is one for all, or each image's parent folder."""
    desc, kept, skipped = describe(network, images, opts, skip_bad=True)
    labels = None
    if labels_from_folders:
        labels = [p.parent.name for p in kept]
    elif label is not None:
        labels = [label] * len(kept)
    ids = index.add(desc, labels=labels, paths=stored_paths(kept))
    return ids, skipped


def index_options(index: Index, **overrides: Any) -> ExtractOptions:
    """Extraction options recorded in the index, with explicit overrides (None = keep). An index
    may come from elsewhere: what it records is checked before anything runs on it."""
    meta = index.metadata
    opts = ExtractOptions()
    if overrides.get("image_size") is None:
        size = meta.get("image_size", 1024)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"the index records image_size {size!r:.40}, expected an int in [1, {MAX_IMAGE_SIZE}]; "
                             "pass --image-size")
        opts.image_size = size
    if overrides.get("scales") is None:
        scales = meta.get("scales", [1.0])
        if not isinstance(scales, list) or not 1 <= len(scales) <= 16 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 4 for v in scales):
            raise ValueError(f"the index records scales {scales!r:.60}, expected 1 to 16 numbers in (0, 4]")
        opts.scales = tuple(float(v) for v in scales)
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


def search_results(index: Any, desc: np.ndarray, queries: Sequence[str], k: int = 5) -> list[dict]:
    """The JSON of `pylandmark search --json` for (Q, D) query descriptors named `queries`
    (index: an Index, or a view with its labels, paths, ids and search_rows)."""
    scores, rows = index.search_rows(desc, k=k)
    labels, paths, ids = index.labels, index.paths, index.ids
    out = []
    for name, srow, rrow in zip(queries, np.asarray(scores), np.asarray(rows)):
        hits = [{"rank": r + 1, "score": float(s), "id": int(ids[i]),
                 "label": None if labels is None else _plain(labels[i]),
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


def recognition_results(index: Any, desc: np.ndarray, queries: Sequence[str], k: int = 5,
                        vote: str = "majority", min_score: float | None = None) -> list[dict]:
    """The JSON of `pylandmark recognize --json` for (Q, D) query descriptors named `queries`
    (index: an Index, or a view with its labels, paths and ids)."""
    from .retrieval.recognition import recognize

    if index.labels is None:
        raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
    res = recognize(index, desc, k=k, vote=vote, min_score=min_score)
    paths, ids = index.paths, index.ids
    out = []
    for q, name in enumerate(queries):
        hits = [{"score": float(res.scores[q, j]), "id": int(ids[r]), "label": _plain(res.neighbor_labels[q, j]),
                 "path": None if paths is None else paths[r]}
                for j, r in enumerate(res.neighbors[q]) if r >= 0]
        out.append({"query": str(name), "label": _plain(res.labels[q]), "known": bool(res.known[q]),
                    "confidence": float(res.confidences[q]), "votes": int(res.votes[q]), "neighbours": hits})
    return out


def descriptor_files(out: str | Path) -> tuple[Path, Path]:
    """The two files ``pylandmark extract --out OUT`` writes: the array where ``np.save(OUT)``
    would put it (``.npy`` appended when missing) and the listing ``<OUT>.paths.txt``."""
    out = Path(out)
    return (out if out.suffix == ".npy" else out.with_name(out.name + ".npy")), out.with_suffix(".paths.txt")


def save_descriptors(out: str | Path, descriptors: np.ndarray, paths: Sequence[Any]) -> tuple[Path, Path]:
    """Writes ``pylandmark extract``'s outputs: the (N, D) array as ``.npy`` and one path per
    line in ``<out>.paths.txt``, each through a temporary file (a failure keeps the old pair).
    Returns both paths."""
    from ._files import replaced_atomically

    target, listing = descriptor_files(out)
    with replaced_atomically(target) as tmp, replaced_atomically(listing) as tmp_list:
        with open(tmp, "wb") as f:
            np.save(f, descriptors)
        tmp_list.write_text("".join(f"{p}\n" for p in paths))
    return target, listing


def folder_truth(images: Sequence[Path], index_labels: Any) -> list[Any] | None:
    """The true labels of query images that sit in class folders (``<dir>/<label>/<image>``
    with every parent folder name one of the index's labels), else None."""
    known = {str(lab): lab for lab in index_labels}
    parents = [Path(p).parent.name for p in images]
    if not parents or any(name not in known for name in parents):
        return None
    return [_plain(known[name]) for name in parents]


def recognition_summary(results: Sequence[dict]) -> dict | None:
    """Accuracy, per-class counts and the confusion table of recognize_images results that carry
    a ``truth`` label (None when they do not)."""
    from .evaluate import accuracy, confusion

    if not results or any("truth" not in r for r in results):
        return None
    predicted = [r["label"] for r in results]
    truth = [r["truth"] for r in results]
    classes, counts = confusion(predicted, truth)
    per_class = {str(c): {"queries": int(counts[i].sum()), "right": int(counts[i, i])}
                 for i, c in enumerate(classes) if counts[i].sum()}
    return {"accuracy": accuracy(predicted, truth), "right": sum(a == b for a, b in zip(predicted, truth)),
            "queries": len(results), "per_class": per_class, "classes": [str(c) for c in classes],
            "confusion": counts.tolist()}


def evaluate_revisited(network, names: Sequence[str], data_root: str | Path, opts: ExtractOptions, *,
                       qe_k: int = 0, qe_alpha: float = 3.0, dba_k: int = 0, dba_alpha: float = 3.0,
                       keep_ranks: bool = False) -> dict:
    """mAP and mP@k (easy / medium / hard) per dataset, with optional alpha-QE and DBA. With
    keep_ranks each dataset's entry also holds "ranks", the (Q, N) int64 ranking (for plots)."""
    from .data.revisited import RevisitedDataset
    from .ops import search
    from .retrieval.rerank import rerank

    results = {}
    for name in names:
        ds = RevisitedDataset(name, Path(data_root) / name)
        db, _, _ = describe(network, ds.images, opts)
        bboxes = [ds.query_bbox(i) for i in range(ds.n_queries)]
        q, _, _ = describe(network, ds.query_paths, opts, bboxes=bboxes)
        if qe_k or dba_k:
            q, db = rerank(q, db, qe_k=qe_k, qe_alpha=qe_alpha, dba_k=dba_k, dba_alpha=dba_alpha)
        _, ranks = search(q, db, k=len(db))
        res = ds.evaluate(ranks)
        results[name] = {"options": {**asdict(opts), "qe_k": qe_k, "dba_k": dba_k}, **res}
        if keep_ranks:
            results[name]["ranks"] = np.asarray(ranks)
    return results


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v
