"""Kernel dispatch: Triton on CUDA tensors, the plain-PyTorch reference elsewhere.

(Placeholder written by the lead so the runtime can import it; the Triton helper replaces it with the real
dispatch keeping these names.)
"""

from kvx.kernels.reference import attention, cache_append, compact_gather, decode_attention  # noqa: F401
