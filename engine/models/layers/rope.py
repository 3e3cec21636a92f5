"""Rotary position embedding: frequencies from static config, cos/sin from positions at run time.

Owns: the inverse frequencies of every supported rope_type (default, linear, llama3, longrope) and
applying them with the HF rotate_half convention, over the whole head or its first rotary dims.
Must not: hold arrays as state or cache tables sized by a maximum length: frequencies are a
trace-time constant and cos/sin cost one [T, H/2] op per step.
All math is float32, as in HF.

LongRoPE: HF switches between short and long factors by the current sequence length, re-rotating
nothing already cached, so a request that crosses original_max_position_embeddings mixes both. A
paged server must pick once: long factors when the served length (max_len) exceeds
original_max_position_embeddings, short ones otherwise (as vLLM does). Within the original length
that equals HF exactly; beyond it, it equals HF's rotation of a prompt that is already that long.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.models.config import RopeScaling


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling, *, max_len: int | None = None
) -> np.ndarray:
    """Inverse frequencies [R/2] float32 for a rotary dimension R = head_dim (or the rotated part of
    it), a compile-time constant. max_len is the served length; only longrope reads it."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, scaling)
    elif scaling.rope_type == "longrope":
        long = (max_len or 0) > scaling.original_max_position_embeddings
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"longrope needs {inv_freq.size} factors, got {factors.size}")
        inv_freq = inv_freq / factors
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


def rope_cos_sin(
    positions: jax.Array, inv_freq: Sequence[float] | np.ndarray, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """positions [T] int -> cos, sin [T, R] float32 (the half-frequencies repeated, as HF lays them),
    times `scale` (LongRoPE's attention factor, which HF applies to cos and sin alike)."""
    with jax.named_scope("rope"):
        inv = jnp.asarray(inv_freq, jnp.float32)  # [R/2]
        freqs = positions.astype(jnp.float32)[:, None] * inv[None, :]  # [T, R/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, R]
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [T, n, H] rotated by cos/sin [T, R]: the first R dims of each head (R = H unless the
    rotary is partial), the rest passed through; computed in float32, returned in x's dtype."""
    with jax.named_scope("rope"):
        r = cos.shape[-1]
        xf = x.astype(jnp.float32)
        xr, rest = xf[..., :r], xf[..., r:]  # [T, n, R], [T, n, H - R]
        x1, x2 = jnp.split(xr, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)  # HF rotate_half
        out = xr * cos[:, None, :] + rotated * sin[:, None, :]
        if rest.shape[-1]:
            out = jnp.concatenate([out, rest], axis=-1)
        return out.astype(x.dtype)
