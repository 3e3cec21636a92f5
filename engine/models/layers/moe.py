"""Sparse mixture-of-experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE).

Owns: the router (`gate.weight` [E, D]), the stacked experts (`experts.gate_up_proj` [E, 2F, D],
gate rows first, and `experts.down_proj` [E, D, F]: transformers 5's names and [out, in] layout),
the optional shared expert with its sigmoid gate (Qwen2-MoE), routing, and dispatching tokens to
experts as grouped matmuls. Must not: read checkpoints (engine.models.checkpoint_layout stacks the
per-expert tensors real checkpoints hold) or run an expert over tokens not routed to it.

Dispatch: the T x k (token, choice) assignments are sorted by expert, so each expert's rows are
contiguous; the per-expert counts (data, not shapes) tell jax.lax.ragged_dot where each group
starts. T, k and E are static, so one program serves every routing. Padding tokens of a step are
routed like real ones: they cost k rows each and nobody reads their output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engine.models.config import ModelConfig
from engine.models.layers.linear import Linear
from engine.models.layers.mlp import GatedMLP, activation

# Contract the rows' last dim with the weights' last dim ([E, out, in]), one group per expert.
_GROUPED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


def route(logits: jax.Array, k: int, *, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32), best first.

    Softmax over all experts, then the top k; `normalize` rescales those k to sum to 1, which is
    the same as a softmax over the top-k logits (Mixtral's formulation).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, k)  # [T, k]
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _grouped(rows: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [M, in] sorted by group, w [E, out, in], group_sizes [E] -> [M, out]."""
    return jax.lax.ragged_dot_general(rows, w, group_sizes, _GROUPED)


class Experts(nnx.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, *, act: str, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        self.act = activation(act)
        self.num_experts = num_experts
        # Init only matters for tests and abstract builds; real weights come from a checkpoint.
        gate_up = jax.random.normal(rngs.params(), (num_experts, 2 * hidden, dim), dtype) * dim**-0.5
        down = jax.random.normal(rngs.params(), (num_experts, dim, hidden), dtype) * hidden**-0.5
        self.gate_up_proj = nnx.Param(gate_up)  # [E, 2F, D]
        self.down_proj = nnx.Param(down)  # [E, D, F]

    def __call__(self, x: jax.Array, weights: jax.Array, experts: jax.Array) -> jax.Array:
        """x [T, D], weights and experts [T, k] -> sum over k of weight * expert(x), [T, D]."""
        t, k = experts.shape
        flat = experts.reshape(-1)  # [T*k], assignment a = token * k + choice
        order = jnp.argsort(flat, stable=True)  # [T*k] assignments grouped by expert
        group_sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)  # [E]
        rows = jnp.take(x, order // k, axis=0)  # [T*k, D]
        gate, up = jnp.split(_grouped(rows, self.gate_up_proj[...], group_sizes), 2, axis=-1)  # [T*k, F]
        out = _grouped(self.act(gate) * up, self.down_proj[...], group_sizes)  # [T*k, D], sorted
        # Back to (token, choice) order: a gather by the inverse permutation.
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
        out = jnp.take(out, inverse, axis=0).reshape(t, k, -1)  # [T, k, D]
        return jnp.einsum("tkd,tk->td", out, weights.astype(out.dtype))


class SparseMoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        c = config
        self.top_k, self.normalize = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Linear(c.hidden_size, c.num_experts, use_bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(c.num_experts, c.hidden_size, c.moe_intermediate_size, act=c.hidden_act,
                               dtype=dtype, rngs=rngs)
        self.has_shared_expert = c.shared_expert_intermediate_size > 0
        if self.has_shared_expert:
            self.shared_expert = GatedMLP(c.hidden_size, c.shared_expert_intermediate_size,
                                          act=c.hidden_act, use_bias=False, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(c.hidden_size, 1, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        with jax.named_scope("moe"):
            # Logits in the activation dtype, as HF computes them, so bf16 routing ties break alike.
            weights, experts = route(self.gate(x), self.top_k, normalize=self.normalize)  # [T, k]
            out = self.experts(x, weights, experts)
            if self.has_shared_expert:
                out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out
