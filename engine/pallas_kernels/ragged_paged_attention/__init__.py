"""Ragged paged attention: the ABI (metadata) and the pure-JAX reference implementation.

Owns: the package's public names. Must not: pick an implementation for a platform (callers do).
"""

from __future__ import annotations

from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata, kv_cache_shape
from engine.pallas_kernels.ragged_paged_attention.reference import (
    naive_ragged_paged_attention,
    ragged_paged_attention,
)

__all__ = [
    "AttentionMetadata",
    "kv_cache_shape",
    "naive_ragged_paged_attention",
    "ragged_paged_attention",
]
