"""RMSNorm, as Llama-family checkpoints define it.

Owns: the `weight` parameter and the normalization math (float32, then back to the input dtype
before the weight multiply, as HF Llama does). Must not: know which block it sits in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype) -> None:
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))  # [D]

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)  # [..., D]
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)
