"""Retrieval: the index file, exact search over it, re-ranking, and recognition by top-k vote.

Both kinds of index file register their opener with :func:`.format.open_index` when imported;
importing them here makes ``Index.load`` open either kind whichever module a caller imported.
"""
from . import index, manifest  # noqa: F401
