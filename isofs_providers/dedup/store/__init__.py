"""Chunk stores for the dedup provider: the interface (base.py), the embedded store in the
source's `.isofs/`, and the S3 store."""
