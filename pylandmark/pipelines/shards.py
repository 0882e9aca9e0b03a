"""Index builds, index additions and descriptor files written as shards, resumable: what
``torchrun -m pylandmark index build / index add / extract`` run on every rank, and what adding
to a sharded index runs in one process (every helper here works with one rank too).

Every rank lists the same inputs (sorted, so a shared filesystem is needed across hosts) and
describes the contiguous share :func:`pylandmark.runtime.share_bounds` gives it. Building and
adding write one shard per rank, an ordinary index file in ``<out>.shards/``, as soon as that
rank is done; rank 0 writes the manifest (:mod:`pylandmark.retrieval.manifest`) after every
shard exists, atomically. Why shards and a manifest rather than one file merged by rank 0: no
rank ever holds or receives the whole database (at scale it does not fit one host), nothing is
copied twice, a sharded search can give each rank exactly the shard it built, and a rank that
dies loses only its own share: the re-run (same inputs, same network, same number of ranks)
finds the finished shards, checks them, and describes only what is missing. Until the manifest
is written, ``<out>`` is the previous index or nothing. ``extract`` works the same way with
parts in ``<out>.parts/``, concatenated by rank 0 into the ``.npy`` at the end (a descriptor file
is one array by definition).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import runtime as du
from .._files import replaced_atomically, writer_lock
from ..extraction import ExtractOptions, describe
from ..retrieval.format import header_crc
from ..retrieval.index import Index, IndexChangedError, IndexFormatError
from ..retrieval.manifest import (
    ShardedIndex,
    read_manifest,
    remove_stale_shards,
    shard_dir,
    shard_header_crc,
    write_manifest,
)
from .files import descriptor_files, expand_images, stored_paths

__all__ = ["build_index", "add_images", "extract_to_file", "network_fingerprint"]

log = logging.getLogger(__name__)


# ---- resumable shares ----------------------------------------------------------------------

def network_fingerprint(network: torch.nn.Module) -> str:
    """SHA-256 of the network's state (names, dtypes, shapes, values): a re-run resumes only
    with the very same weights."""
    h = hashlib.sha256()
    for name, t in network.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _job_key(kind: str, items: Sequence[str], labels: Sequence | None, network: torch.nn.Module,
             extra: dict) -> str:
    """16 hex digits naming a job: its inputs, settings, network and number of ranks. Every rank
    must compute the same key (same files seen, same options), or the job stops."""
    h = hashlib.sha256()
    h.update(json.dumps({"kind": kind, "world": du.world_size(), "extra": extra,
                         "labels": None if labels is None else [str(v) for v in labels]},
                        sort_keys=True, default=str).encode())
    for item in items:
        h.update(item.encode() + b"\0")
    h.update(network_fingerprint(network).encode())
    key = h.hexdigest()[:16]
    keys = du.all_gather_objects(key)
    if len(set(keys)) > 1:
        raise ValueError("the ranks see different inputs or options (their job keys differ); every rank "
                         "must see the same files (a shared filesystem) and get the same arguments")
    return key


def _resume(file: Path, key: str, lo: int, hi: int) -> Index | None:
    """The share written by an earlier run of this job, if it is there and intact."""
    if not file.is_file():
        return None
    try:
        index = Index.load(file, mmap=True, verify=True)
    except (IndexFormatError, OSError) as err:
        log.warning("rank %d: not resuming from %s (%s); describing the share again", du.rank(), file, err)
        return None
    meta = index.metadata.get("shard") or {}
    if meta.get("key") != key or meta.get("images") != [lo, hi]:
        return None
    return index


def _share(network, images: Sequence[Path], labels: Sequence | None, opts: ExtractOptions, *, folder: Path,
           key: str, metric: str, metadata: dict, paths_of, skip_bad: bool = True) -> dict:
    """Describes this rank's share of ``images`` into an index file in ``folder`` (or finds it
    from an earlier run). Returns the rank's report (also what the manifest needs)."""
    rank, world_ = du.rank(), du.world_size()
    lo, hi = du.share_range(len(images))
    file = folder / f"{key}-{rank:05d}-of-{world_:05d}.plmi"
    index = _resume(file, key, lo, hi)
    resumed = index is not None
    if index is None:
        mine = list(images[lo:hi])
        desc, kept, skipped = describe(network, images, opts, skip_bad=skip_bad, gather=False)  # this share
        keep = set(map(str, kept))
        my_labels = None if labels is None else [lab for p, lab in zip(mine, labels[lo:hi]) if str(p) in keep]
        index = Index(int(desc.shape[1]), metric,
                      {**metadata, "shard": {"key": key, "rank": rank, "world": world_, "images": [lo, hi],
                                             "skipped": skipped}})
        index.add(desc, labels=my_labels, paths=paths_of(kept))
        folder.mkdir(parents=True, exist_ok=True)
        index.save(file)
        log.info("rank %d: described images %d..%d into %s", rank, lo, hi, file)
    else:
        log.info("rank %d: resumed images %d..%d from %s", rank, lo, hi, file)
    return {"rank": rank, "images": hi - lo, "indexed": len(index), "resumed": resumed,
            "skipped": list(index.metadata["shard"].get("skipped", [])), "file": file.name,
            "header_crc": shard_header_crc(file), "dim": index.dim}


def _gather_reports(report: dict) -> list[dict]:
    reports = du.all_gather_objects(report)
    dims = {r["dim"] for r in reports if r["indexed"]}
    if len(dims) > 1:
        raise ValueError(f"the ranks' descriptors have different sizes {sorted(dims)}; use one network")
    return reports


def _public(reports: Sequence[dict]) -> list[dict]:
    return [{k: r[k] for k in ("rank", "images", "indexed", "resumed")} for r in reports]


# ---- build / add / extract -----------------------------------------------------------------

def build_index(network, folder: str | Path, opts: ExtractOptions, out: str | Path, *,
                labels_from_folders: bool = True, weights: str = "") -> dict:
    """``pylandmark index build`` on every rank: shards plus manifest at ``out``.

    Returns (on every rank) ``{"index": ShardedIndex (rank 0; None elsewhere), "ranks": [...],
    "skipped": [...]}``; ``ranks`` holds per rank ``images`` (its share of the listing),
    ``indexed`` (rows it contributed), ``resumed`` (found from an earlier run)."""
    from ..data.folders import LabelledFolder

    out = Path(out)
    if labels_from_folders:
        ds = LabelledFolder(folder)
        images, labels = [Path(p) for p in ds.paths], list(ds.labels)
    else:
        images, labels = expand_images([folder]), None
    metadata = {"weights": weights, **opts.metadata()}
    key = _job_key("build", stored_paths(images), labels, network, {"metadata": metadata})
    report = _share(network, images, labels, opts, folder=shard_dir(out), key=key, metric="cosine",
                    metadata=metadata, paths_of=stored_paths)
    reports = _gather_reports(report)
    if du.rank() == 0:
        entries, offset = [], 0
        for r in reports:
            entries.append({"file": r["file"], "count": r["indexed"], "id_offset": offset,
                            "header_crc": r["header_crc"]})
            offset += r["indexed"]
        with writer_lock(out):  # the manifest and the clean-up of the shards it replaces, as one writer
            write_manifest(out, dim=_dim(reports, network), metric="cosine", metadata=metadata, shards=entries)
            remove_stale_shards(out, keep={e["file"] for e in entries})
    du.barrier()
    index = Index.load(out, verify=False) if du.rank() == 0 else None
    return {"index": index, "ranks": _public(reports), "skipped": [s for r in reports for s in r["skipped"]]}


def _dim(reports: Sequence[dict], network) -> int:
    dims = [r["dim"] for r in reports if r["indexed"]]
    return dims[0] if dims else int(network.dim)


def add_images(index_path: str | Path, network, images: Sequence[Path], opts: ExtractOptions, *,
               label: str | None = None, labels_from_folders: bool = False) -> dict:
    """``pylandmark index add`` on every rank (also in one process for a sharded index): the new
    images become new shards after the index's rows; a single-file index becomes the manifest's
    first shard (hard-linked into ``<index>.shards/``, or copied where links fail).

    New ids continue after the largest id, in image order, as one process would give them.
    Returns ``{"added": n, "count": rows after, "ranks": [...], "skipped": [...]}``."""
    path = Path(index_path)
    base = Index.load(path, mmap=True, verify=du.rank() == 0)  # rank 0 reads every byte once
    images = list(images)
    labels = None
    if labels_from_folders:
        labels = [p.parent.name for p in images]
    elif label is not None:
        labels = [label] * len(images)
    _check_addable(base, labels, network)
    base_crc = header_crc(path)  # of the manifest or the single file: either identifies the base
    key = _job_key("add", stored_paths(images), labels, network,
                   {"base": [base_crc, len(base)], "metadata": base.metadata})
    report = _share(network, images, labels, opts, folder=shard_dir(path), key=key, metric=base.metric,
                    metadata=base.metadata, paths_of=stored_paths)
    reports = _gather_reports(report)
    added = sum(r["indexed"] for r in reports)
    count = [len(base) + added]
    if du.rank() == 0:
        count[0] = _register_shards(path, reports) + added
    count = du.broadcast_object(count)
    du.barrier()
    return {"added": added, "count": count[0], "ranks": _public(reports),
            "skipped": [s for r in reports for s in r["skipped"]]}


def _register_shards(path: Path, reports: Sequence[dict]) -> int:
    """Appends the ranks' new shards to the index at ``path`` as it is now (another writer may
    have added rows since this job started), holding the writers' lock from reading it to the
    manifest's rename; ids continue after the largest. Returns the rows before the new ones.
    Shards of other jobs are left alone: a concurrent adder's are not in the manifest yet."""
    folder = shard_dir(path)
    with writer_lock(path):
        current = Index.load(path, mmap=True, verify=False)
        missing = [r["file"] for r in reports if r["indexed"] and not (folder / r["file"]).is_file()]
        if missing:
            raise IndexChangedError(f"{path} was rebuilt while the images were described (shard {missing[0]} is "
                                    "gone); run the add again")
        if isinstance(current, ShardedIndex):
            entries = list(read_manifest(path)["shards"])
        else:
            entries = [_adopt_base_file(path, header_crc(path), len(current))]
        offset = int(current.ids.max()) + 1 if len(current) else 0
        for r in reports:
            entries.append({"file": r["file"], "count": r["indexed"], "id_offset": offset,
                            "header_crc": r["header_crc"]})
            offset += r["indexed"]
        write_manifest(path, dim=current.dim, metric=current.metric, metadata=current.metadata, shards=entries)
        return len(current)


def _check_addable(base, labels: Sequence | None, network) -> None:
    """The checks Index.add makes, made before any image is described."""
    if len(base):
        if base.labels is not None and labels is None:
            raise ValueError("this index has labels for every row; pass labels for the new rows too "
                             "(--label or --labels-from-folders)")
        if base.labels is None and labels is not None:
            raise ValueError("this index has no labels; it cannot get them for only some rows")
        if base.paths is None:
            raise ValueError("this index has no paths; it cannot get them for only some rows")
    dim = getattr(network, "dim", None)
    if dim is not None and int(dim) != base.dim:
        raise ValueError(f"descriptors must be (n, {base.dim}) for this index, but the network gives D={dim}")


def _adopt_base_file(path: Path, crc: int, count: int) -> dict:
    """The single-file index at ``path`` as the first shard of the manifest that replaces it."""
    folder = shard_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"base-{crc:08x}.plmi"
    target = folder / name
    if not target.is_file() or shard_header_crc(target) != crc:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return {"file": name, "count": count, "id_offset": 0, "header_crc": crc}


def extract_to_file(network, images: Sequence[Path], opts: ExtractOptions, out: str | Path, *,
                    skip_bad: bool = False) -> dict:
    """``pylandmark extract`` on every rank: parts in ``<out>.parts/``, then rank 0 writes the
    (N, D) float16 ``.npy`` and the ``.paths.txt`` listing (each atomically) and removes the
    parts. Returns ``{"out", "paths" (the two files), "count", "dim", "ranks", "skipped"}``."""
    out = Path(out)
    target, listing = descriptor_files(out)
    parts = out.parent / f"{out.name}.parts"
    images = list(images)
    key = _job_key("extract", [str(p) for p in images], None, network,
                   {"metadata": opts.metadata(), "skip_bad": skip_bad})
    # metric "ip" stores the float16 descriptors exactly as extracted (cosine would renormalise)
    report = _share(network, images, None, opts, folder=parts, key=key, metric="ip", metadata={},
                    paths_of=lambda kept: [str(p) for p in kept], skip_bad=skip_bad)
    reports = _gather_reports(report)
    count, dim = sum(r["indexed"] for r in reports), _dim(reports, network)
    if du.rank() == 0:
        with replaced_atomically(target) as tmp, replaced_atomically(listing) as tmp_list:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(count, dim))
            names, row = [], 0
            for r in reports:
                part = Index.load(parts / r["file"], mmap=True, verify=True)
                arr[row:row + len(part)] = part.descriptors
                row += len(part)
                names += part.paths or []
            arr.flush()
            del arr
            tmp_list.write_text("".join(f"{p}\n" for p in names))
        for r in reports:
            (parts / r["file"]).unlink(missing_ok=True)
        _remove_if_empty(parts)
    du.barrier()
    return {"out": target, "paths": listing, "count": count, "dim": dim, "ranks": _public(reports),
            "skipped": [s for r in reports for s in r["skipped"]]}


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
