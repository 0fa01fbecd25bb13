"""The dedup provider: content-defined chunks in a chunk store, the native file a manifest."""
