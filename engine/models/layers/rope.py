"""Rotary position embedding: frequencies from static config, cos/sin from positions at run time.

Owns: the inverse frequencies of every supported rope_type (default, linear, llama3) and applying
them with the HF rotate_half convention. Must not: hold arrays as state or cache tables sized by a
maximum length: frequencies are a trace-time constant and cos/sin cost one [T, H/2] op per step.
All math is float32, as in HF.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.models.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies [H/2] float32 for the config (a compile-time constant)."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3(inv_freq: np.ndarray, sc: RopeScaling) -> np.ndarray:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_len = sc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    long_wave = wavelen > old_len / sc.low_freq_factor
    short_wave = wavelen < old_len / sc.high_freq_factor
    smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * inv_freq / sc.factor + smooth * inv_freq
    return np.where(long_wave, inv_freq / sc.factor, np.where(short_wave, inv_freq, blended))


def rope_cos_sin(positions: jax.Array, inv_freq: Sequence[float] | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [T] int -> cos, sin [T, H] float32 (the half-frequencies repeated, as HF lays them)."""
    with jax.named_scope("rope"):
        inv = jnp.asarray(inv_freq, jnp.float32)  # [H/2]
        freqs = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, H/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, H]
        return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, n, H] rotated by cos/sin [T, H]; computed in float32, returned in x's dtype."""
    with jax.named_scope("rope"):
        xf = x.astype(jnp.float32)
        x1, x2 = jnp.split(xf, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)  # HF rotate_half
        return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)
