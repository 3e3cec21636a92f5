"""Token embedding, and the tied output projection that reuses its table.

Owns: `weight` [V, D] (HF layout) and both directions through it. Must not: scale or normalize
embeddings on its own; families that do (Gemma) will say so through config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Embed(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim), dtype))  # [V, D]

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Ids are validated at admission; "clip" keeps a stray one from turning into NaNs.
        return jnp.take(self.weight[...], ids, axis=0, mode="clip")  # [T, D]

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied logits: hidden [R, D] -> [R, V] float32."""
        return jnp.einsum("rd,vd->rv", hidden, self.weight[...], preferred_element_type=jnp.float32)
