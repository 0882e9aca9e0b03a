"""End-to-end jobs from image files, one per `pylandmark` command: :mod:`.local` in one process,
:mod:`.torchrun` (same names and results) under a torchrun launch, :mod:`.shards` for the index
files written in shards, :mod:`.files` for the files they read and write. The names below are the
single-process ones (torch is imported on first use of a job that needs it)."""
from __future__ import annotations

from ..extraction import ExtractOptions, describe
from .files import descriptor_files, expand_images, save_descriptors, stored_paths
from .local import (
    add_images,
    add_to_index_file,
    build_index,
    build_index_file,
    check_against_index,
    evaluate_revisited,
    extract_to_file,
    folder_truth,
    index_options,
    network_weights,
    open_index,
    recognition_results,
    recognition_summary,
    recognize_images,
    reranked,
    search_images,
    search_results,
    whiten_to_file,
    whitening_inputs,
)

__all__ = ["ExtractOptions", "describe", "expand_images", "stored_paths", "descriptor_files", "save_descriptors",
           "build_index", "add_images", "index_options", "check_against_index", "search_images", "search_results",
           "recognize_images", "recognition_results", "folder_truth", "recognition_summary", "evaluate_revisited",
           "open_index", "extract_to_file", "build_index_file", "add_to_index_file", "network_weights",
           "whitening_inputs", "whiten_to_file", "reranked"]
