"""Retrieval: the index file, exact search over it, re-ranking, and recognition by top-k vote."""
