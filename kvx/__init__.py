"""kvx: long-context LLM inference with a KV cache that really shrinks."""

__version__ = "0.1.0"
