"""RMSNorm, in the two conventions checkpoints use: Llama's and Gemma's.

Owns: the `weight` parameter and the normalization math. Llama (HF LlamaRMSNorm) normalizes in
float32, casts back to the input dtype, then multiplies by the weight; Gemma (unit_offset) stores
the weight as an offset from 1 and multiplies by (1 + weight) in float32 before casting back, so
the two round differently in bfloat16. A `scale_only` norm has no weight (it was folded into the
projection after it, engine.models.fuse) and gives only `row_scale`. Must not: know which block it
sits in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, unit_offset: bool = False,
                 scale_only: bool = False) -> None:
        self.eps = eps
        self.unit_offset = unit_offset
        # Either way the freshly built norm is the identity.
        self.weight = None if scale_only else nnx.Param(
            jnp.zeros((dim,), dtype) if unit_offset else jnp.ones((dim,), dtype))  # [D]

    def row_scale(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> 1/rms of each row, [..., 1] float32."""
        xf = x.astype(jnp.float32)
        return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.weight is None:
            raise TypeError("a scale-only RMSNorm gives row_scale(x); its weight lives in the next projection")
        xf = x.astype(jnp.float32) * self.row_scale(x)  # [..., D]
        if self.unit_offset:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * xf.astype(x.dtype)
