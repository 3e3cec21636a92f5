"""Linear projection with Hugging Face weight layout.

Owns: `weight` [out, in] (HF/torch layout, so checkpoints load without transposes) and an optional
`bias` [out]; `row_scale` multiplies each output row before the bias (a norm folded into the
weight, engine.models.fuse). Must not: fuse projections or choose a sharding; those belong to callers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        # Init only matters for tests and abstract builds; real weights come from a checkpoint.
        scale = in_features**-0.5
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (out_features, in_features), dtype) * scale)
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array, row_scale: jax.Array | None = None) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])  # [..., out]
        if row_scale is not None:  # [..., 1] float32
            y = (y.astype(jnp.float32) * row_scale).astype(y.dtype)
        if self.bias is not None:
            y = y + self.bias[...]
        return y
