"""Gated feed-forward block (SwiGLU and its GeGLU variants).

Owns: gate_proj/up_proj/down_proj (HF names), or gate_up_proj/down_proj where a family stores
gate and up as one tensor (Phi-3: gate rows first), and the activation lookup. Must not: know the
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
                 rngs: nnx.Rngs, fused: bool = False) -> None:
        self.act = activation(act)
        self.fused = fused
        if fused:  # param names follow the checkpoint
            self.gate_up_proj = Linear(dim, 2 * hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
        else:
            self.gate_proj = Linear(dim, hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
            self.up_proj = Linear(dim, hidden, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(hidden, dim, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, row_scale: jax.Array | None = None) -> jax.Array:
        """x [T, D] -> [T, D]; row_scale [T, 1]: the 1/rms of a norm folded into gate and up."""
        with jax.named_scope("mlp"):
            if self.fused:
                gate, up = jnp.split(self.gate_up_proj(x, row_scale), 2, axis=-1)  # [T, F] each
            else:
                gate, up = self.gate_proj(x, row_scale), self.up_proj(x, row_scale)
            return self.down_proj(self.act(gate) * up)  # [T, D]
