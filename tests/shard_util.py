"""Helpers for the sharded-index tests: hand-made shard manifests next to the one index file
holding the same rows (the reference every sharded result is compared with)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import pylandmark as plm
from pylandmark.retrieval.manifest import shard_dir, shard_header_crc, write_manifest


def rows_with_ties(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 rows where a few are exact copies of earlier ones (in other shards), so
    that tied scores must be ordered by the lower global row."""
    x = rng.normal(size=(n, dim)).astype(np.float32)
    for dst, src in ((n - 1, 1), (n // 2, 1), (n - 3, 2)):
        if 0 <= src < dst < n:
            x[dst] = x[src]
    return x


def make_sharded(folder: Path, counts: list[int], dim: int, rng: np.random.Generator, *, name: str = "idx.plmi",
                 metric: str = "cosine", labelled: bool = True, id_start: int = 0) -> tuple[Path, Path, plm.Index]:
    """Writes the same rows twice: as shards of ``counts`` rows plus a manifest, and as one index
    file. Returns (manifest path, single-file path, the single index loaded)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = sum(counts)
    x = rows_with_ties(rng, n, dim)
    labels = [f"class{i % 4}" for i in range(n)] if labelled else None
    paths = [f"/images/{i:04d}.jpg" for i in range(n)]
    ids = np.arange(id_start, id_start + n, dtype=np.int64)
    single = plm.Index(dim, metric, metadata={"weights": "test"})
    single.add(x, labels=labels, paths=paths, ids=ids)
    single_path = single.save(folder / f"single-{name}")
    manifest = folder / name
    entries, start = [], 0
    for i, c in enumerate(counts):
        shard = plm.Index(dim, metric, metadata={"weights": "test"})
        # stored ids 0..c-1, shifted by the manifest's id_offset, as the distributed build does
        shard.add(x[start:start + c], labels=None if labels is None else labels[start:start + c],
                  paths=paths[start:start + c], ids=np.arange(c, dtype=np.int64))
        f = shard.save(shard_dir(manifest) / f"part{i}.plmi")
        entries.append({"file": f.name, "count": c, "id_offset": id_start + start, "header_crc": shard_header_crc(f)})
        start += c
    write_manifest(manifest, dim=dim, metric=metric, metadata={"weights": "test"}, shards=entries)
    return manifest, single_path, plm.Index.load(single_path)
