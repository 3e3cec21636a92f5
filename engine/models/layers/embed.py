"""Token embedding, and the tied output projection that reuses its table.

Owns: `weight` [V, D] (HF layout) and both directions through it, with the optional input scale
a family asks for through config (Gemma: sqrt(hidden_size)). Must not: normalize embeddings or
decide on a scale itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 scale: float | None = None) -> None:
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim), dtype))  # [V, D]
        self.scale = scale

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Ids are validated at admission; "clip" keeps a stray one from turning into NaNs.
        x = jnp.take(self.weight[...], ids, axis=0, mode="clip")  # [T, D]
        if self.scale is not None:
            # HF Gemma rounds the float32 scale to the param dtype first (sqrt(3072) is 55.5 in
            # bfloat16, not 55.43), and the checkpoints were trained so.
            x = x * jnp.asarray(self.scale, jnp.float32).astype(x.dtype)
        return x

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied logits: hidden [R, D] -> [R, V] float32."""
        return jnp.einsum("rd,vd->rv", hidden, self.weight[...], preferred_element_type=jnp.float32)
