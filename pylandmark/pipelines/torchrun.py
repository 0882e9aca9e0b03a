"""The `pylandmark` commands under torchrun: the same jobs as :mod:`.local`, with the same
signatures and results, each rank describing a share of the images (:func:`pylandmark.extraction.describe`)
and the queries answered by a sharded search (:class:`~pylandmark.retrieval.sharded.DistributedIndex`).
Writing jobs are in :mod:`.shards`.

``torchrun --nproc-per-node N -m pylandmark <command> ...`` runs the command on N ranks (each on
its own device: ``--device cuda`` means cuda:LOCAL_RANK).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import runtime as du
from ..extraction import ExtractOptions, describe
from ..retrieval.sharded import DistributedIndex
from .local import folder_truth, json_value
from .shards import add_images as add_to_index_file
from .shards import build_index as build_index_file
from .shards import extract_to_file

__all__ = ["join", "leave", "open_index", "extract_to_file", "build_index_file", "add_to_index_file",
           "search_images", "recognize_images", "evaluate_revisited"]


def join(device: str | None) -> str:
    """Joins the process group (gloo for the CPU, NCCL for CUDA) and returns this rank's device:
    "cuda" becomes cuda:LOCAL_RANK."""
    dev = torch.device(device or "cpu")
    du.init_from_env(dev.type)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{du.local_rank()}"
    return str(dev)


def leave() -> None:
    if du.is_distributed():
        torch.distributed.destroy_process_group()


def open_index(path: str | Path, device: Any = None) -> DistributedIndex:
    """This rank's rows of the index at ``path`` (a single file or a manifest)."""
    return DistributedIndex.open(path, device=device)


def search_images(index, network, images: Sequence[Path], opts: ExtractOptions, k: int = 5,
                  superglobal: Mapping[str, Any] | None = None) -> list[dict]:
    """``pylandmark search`` over a :class:`~pylandmark.retrieval.sharded.DistributedIndex`:
    the same list of dicts as :func:`.local.search_images`, on every rank."""
    desc, _, _ = describe(network, images, opts)
    scores, rows = index.search_rows(desc, k=k, src=None, rerank=_rerank(superglobal))
    found = index.lookup(rows)
    out = []
    for q, img in enumerate(images):
        hits = [{"rank": j + 1, "score": float(scores[q, j]), "id": int(found["ids"][q, j]),
                 "label": None if found["labels"] is None else found["labels"][q, j],
                 "path": None if found["paths"] is None else found["paths"][q, j]}
                for j in range(rows.shape[1]) if rows[q, j] >= 0]
        out.append({"query": str(img), "neighbours": hits})
    return out


def recognize_images(index, network, images: Sequence[Path], opts: ExtractOptions, k: int = 5,
                     vote: str = "majority", min_score: float | None = None,
                     superglobal: Mapping[str, Any] | None = None) -> list[dict]:
    """``pylandmark recognize`` over a DistributedIndex: the same list of dicts as
    :func:`.local.recognize_images`, on every rank."""
    if not index.labelled:
        raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
    desc, _, _ = describe(network, images, opts)
    res = index.recognize(desc, k=k, vote=vote, min_score=min_score, src=None, rerank=_rerank(superglobal))
    found = index.lookup(res.neighbors)
    out = []
    for q, img in enumerate(images):
        hits = [{"score": float(res.scores[q, j]), "id": int(found["ids"][q, j]), "label": res.neighbor_labels[q, j],
                 "path": None if found["paths"] is None else found["paths"][q, j]}
                for j, r in enumerate(res.neighbors[q]) if r >= 0]
        out.append({"query": str(img), "label": json_value(res.labels[q]), "known": bool(res.known[q]),
                    "confidence": float(res.confidences[q]), "votes": int(res.votes[q]), "neighbours": hits})
    truth = folder_truth(images, index.label_set())
    if truth is not None:
        for r, lab in zip(out, truth):
            r["truth"] = lab
    return out


def _rerank(superglobal: Mapping[str, Any] | None) -> Any:
    """The ``rerank=`` of a DistributedIndex's search for :func:`.local.reranked`'s settings."""
    if superglobal is None:
        return None
    from ..retrieval.rerank import superglobal as superglobal_rerank

    return functools.partial(superglobal_rerank, **superglobal)


def evaluate_revisited(network: Any, names: Sequence[str], data_root: str | Path, opts: ExtractOptions,
                       **kwargs: Any) -> dict:
    """``pylandmark evaluate`` on every rank: :func:`pylandmark.evaluate.protocol.evaluate_revisited`
    (each rank describes and keeps its share of the database; a sharded search ranks it)."""
    from ..evaluate.protocol import evaluate_revisited as run

    return run(network, names, data_root, opts, **kwargs)
