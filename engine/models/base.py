"""The model protocol: what the runner, loader and tests may rely on from any causal LM port.

Owns: the `CausalLM`, `AttentionFn` and `RowGemvFn` interfaces. Must not: implement a model or
import one.

A step runs the flat, padded stream of T tokens of the attention ABI (see
engine.pallas_kernels.ragged_paged_attention.metadata); positions come from `md.positions`.
Parameters are in the model's param dtype; norms and rotary math run in float32; logits are float32.
Every parameter's state path, joined with '.', is its Hugging Face state_dict name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
from flax import nnx

from engine.models.config import ModelConfig
from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata


class AttentionFn(Protocol):
    """Ragged paged attention behind the ABI: the reference, or a kernel with the same contract."""

    def __call__(
        self,
        q: jax.Array,  # [T, N, H]
        k: jax.Array,  # [T, K, H]
        v: jax.Array,  # [T, K, H]
        kv_cache: jax.Array,  # [2, P, S, K, H]
        md: AttentionMetadata,
        *,
        sm_scale: float,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        num_q_heads: int | None = None,  # q [T, N + 2K, H] a fused projection: its first N heads
    ) -> tuple[jax.Array, jax.Array]: ...  # out [T, N, H] in q's dtype, new kv_cache


class RowGemvFn(Protocol):
    """A one-row projection with the work around it fused in (engine.pallas_kernels.gemv_gpu):
    epilogue(W x) where the epilogue scales by a folded norm's 1/rms of x (rms_eps), adds bias,
    applies act(gate) * up to [gate; up] rows (act) or rope to the leading rope_heads heads of a
    fused q/k/v, then adds a residual."""

    def supports(self, n: int, k: int, *, gated: bool = False, rope_dim: int | None = None) -> bool: ...

    def __call__(
        self,
        x: jax.Array,  # [1, K]
        w: jax.Array,  # [N, K]
        *,
        residual: jax.Array | None = None,  # [1, N] (gated: [1, N / 2])
        bias: jax.Array | None = None,  # [N]
        rms_eps: float | None = None,
        act=None,
        rope: tuple[jax.Array, jax.Array] | None = None,  # cos, sin [1, H] float32
        rope_heads: int | None = None,
    ) -> jax.Array: ...  # [1, N] (gated: [1, N / 2]) in x's dtype


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig

    def __call__(
        self,
        input_ids: jax.Array,  # [T] int32
        kv_caches: tuple[jax.Array, ...],  # L x [2, P, S, K, H]
        md: AttentionMetadata,
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:  # hidden [T, D] after the final norm, new caches
        ...

    def compute_logits(self, hidden: jax.Array) -> jax.Array:  # [R, D] -> [R, V] float32
        ...


def set_attention_fn(model: nnx.Module, attention_fn: AttentionFn) -> int:
    """Points every attention block of `model` at `attention_fn` (static: do it before jit/split).

    Returns how many blocks were changed, so a caller can tell a model without any apart.
    """
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "attention_fn"):
            node.attention_fn = attention_fn
            count += 1
    return count


def set_row_gemv(model: nnx.Module, row_gemv: RowGemvFn | None) -> int:
    """Points every decoder layer of `model` that can run a one-row step on `row_gemv` at it (None:
    XLA's dots). Static, like set_attention_fn. Returns how many layers took it."""
    count = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and hasattr(node, "row_gemv"):
            node.row_gemv = row_gemv if node.can_run_row_gemv(row_gemv) else None
            count += node.row_gemv is not None
    return count
