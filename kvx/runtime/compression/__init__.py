"""Compression: selection and compaction after a prefill, decode-time eviction, the prefill schedules that compression shapes (chunked, split), KVzip's reconstruction passes."""
