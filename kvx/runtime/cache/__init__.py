"""The KV cache: the shared block pool, one sequence's paged cache, the snapshot a question rewinds to."""
