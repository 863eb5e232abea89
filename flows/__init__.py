"""Prefect flows over the DVC stages: compress, recompress (scheduled), sweep."""
