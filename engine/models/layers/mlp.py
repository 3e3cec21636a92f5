"""Gated feed-forward block (SwiGLU and its GeGLU variants).

Owns: gate_proj/up_proj/down_proj (HF names) and the activation lookup. Must not: know the
family; the activation comes from the config's HF `hidden_act` string.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from engine.models.layers.linear import Linear

ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = types.MappingProxyType({
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
})


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        self.act = activation(act)
        self.gate_proj = Linear(dim, hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(dim, hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(hidden, dim, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            h = self.act(self.gate_proj(x)) * self.up_proj(x)  # [T, F]
            return self.down_proj(h)  # [T, D]
