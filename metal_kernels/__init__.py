"""Attention hot path: Metal kernel sources, the MLX wrapper with its VJP, the CPU emulator.

    from metal_kernels import attention
    o = attention(q, k, v, window=W, scale=1 / D ** 0.5)   # (B, H, T, D)

Imports only MLX (the emulator, metal_kernels.emulator, needs numpy and a C++ compiler and is
imported only by tests and tools).
"""

from .attention import (PREFERRED_HEAD_DIMS, TOLERANCE, attention, attention_with_lse, band_mask, has_kernel, metal_available,
                        self_test, warmup)
from .kernels import DKDV_SOURCE, DQ_SOURCE, FORWARD_SOURCE, HEADER, dkdv_call, dq_call, forward_call

__all__ = [
    "attention", "attention_with_lse", "band_mask", "has_kernel", "metal_available", "self_test", "warmup",
    "TOLERANCE", "PREFERRED_HEAD_DIMS",
    "HEADER", "FORWARD_SOURCE", "DQ_SOURCE", "DKDV_SOURCE", "forward_call", "dq_call", "dkdv_call",
]
