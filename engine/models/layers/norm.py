"""RMSNorm, in the two conventions checkpoints use: Llama's and Gemma's.

Owns: the `weight` parameter and the normalization math. Llama (HF LlamaRMSNorm) normalizes in
float32, casts back to the input dtype, then multiplies by the weight; Gemma (unit_offset) stores
the weight as an offset from 1 and multiplies by (1 + weight) in float32 before casting back, so
the two round differently in bfloat16. Must not: know which block it sits in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, unit_offset: bool = False) -> None:
        self.eps = eps
        self.unit_offset = unit_offset
        # Either way the freshly built norm is the identity.
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if unit_offset else jnp.ones((dim,), dtype))  # [D]

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)  # [..., D]
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)
