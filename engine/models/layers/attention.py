"""Self-attention block over the paged KV cache.

Owns: q/k/v/o projections (HF names and layout; q/k/v fused as qkv_proj where the checkpoint
stores them so), splitting heads, rotary, and handing the step to
the ragged paged attention function. Must not: index the cache itself or build masks; the
attention function owns the cache layout and the causal/window rules (see the ABI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engine.models.base import AttentionFn
from engine.models.config import ModelConfig
from engine.models.layers.linear import Linear
from engine.models.layers.norm import RMSNorm
from engine.models.layers.rope import apply_rope
from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, attention_fn: AttentionFn, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.sliding_window = c.sliding_window_for(layer)
        self.kv_group = c.kv_group_of(layer)  # static: which page pool's tables this layer reads
        # Gemma scales scores by query_pre_attn_scalar, which need not be head_dim.
        self.sm_scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.soft_cap = c.attn_logit_softcap
        self.attention_fn = attention_fn
        qkv = dict(use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.fused_qkv = c.fused_qkv
        if c.fused_qkv:  # Phi-3's checkpoint layout: q, k, v rows stacked in one projection
            self.qkv_proj = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim, **qkv)
        else:
            self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, **qkv)
            self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **qkv)
            self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **qkv)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_proj_bias, dtype=dtype,
                             rngs=rngs)
        if c.qk_norm:
            norm = dict(eps=c.rms_norm_eps, dtype=dtype, unit_offset=c.norm_unit_offset)
            self.q_norm = RMSNorm(c.head_dim, **norm)  # shared by every head
            self.k_norm = RMSNorm(c.head_dim, **norm)
        self.qk_norm = c.qk_norm

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        rope: tuple[jax.Array, jax.Array],  # cos, sin [T, R] float32 (R: rotary dims, <= H)
        kv_cache: jax.Array,  # [2, P, S, K, H]
        md: AttentionMetadata,
        row_scale: jax.Array | None = None,  # [T, 1] float32: the 1/rms of a norm folded into q/k/v
    ) -> tuple[jax.Array, jax.Array]:
        with jax.named_scope("attention"):
            t = x.shape[0]
            if self.fused_qkv and not self.qk_norm:
                return self._fused(x, rope, kv_cache, md, row_scale)
            if self.fused_qkv:
                qkv = self.qkv_proj(x, row_scale)  # [T, (N + 2K) * H]
                nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nk], qkv[:, nq + nk:]
            else:
                q, k, v = self.q_proj(x, row_scale), self.k_proj(x, row_scale), self.v_proj(x, row_scale)
            q = q.reshape(t, self.num_heads, self.head_dim)  # [T, N, H]
            k = k.reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
            v = v.reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out, kv_cache = self.attention_fn(
                q, k, v, kv_cache, md.for_group(self.kv_group), sm_scale=self.sm_scale,
                sliding_window=self.sliding_window, soft_cap=self.soft_cap,
            )  # [T, N, H]
            return self.o_proj(out.reshape(t, -1)), kv_cache  # [T, D]

    def _fused(self, x, rope, kv_cache, md, row_scale):
        out, kv_cache = self.attend_fused(self.qkv_proj(x, row_scale), rope, kv_cache, md)
        return self.o_proj(out), kv_cache  # [T, D]

    def attend_fused(self, qkv, rope, kv_cache, md):
        """qkv [T, (N + 2K) * H], the fused projection's output -> (attention output [T, N * H]
        before o_proj, new cache). rope None: q and k are already rotated.

        q/k/v stay one array throughout: rope runs over all of its heads at once (v's kept as they
        were) and the attention reads q in place. At one row each slice of q/k/v otherwise costs a
        launch of its own (a lone decode is launch bound: bench/RESULTS.md)."""
        t, n, kh = qkv.shape[0], self.num_heads, self.num_kv_heads
        qkv = qkv.reshape(t, n + 2 * kh, self.head_dim)  # [T, N + 2K, H]
        if rope is not None:  # None: the projection already turned q and k
            is_v = jnp.arange(n + 2 * kh) >= n + kh  # [N + 2K]
            qkv = jnp.where(is_v[None, :, None], qkv, apply_rope(qkv, *rope))
        out, kv_cache = self.attention_fn(
            qkv, qkv[:, n:n + kh], qkv[:, n + kh:], kv_cache, md.for_group(self.kv_group), sm_scale=self.sm_scale,
            sliding_window=self.sliding_window, soft_cap=self.soft_cap, num_q_heads=n,
        )  # [T, N, H]
        return out.reshape(t, -1), kv_cache
