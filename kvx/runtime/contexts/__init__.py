"""Compressed contexts that outlive their request: stored, saved to files, shared in the pool."""
