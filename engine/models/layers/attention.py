"""Self-attention block over the paged KV cache.

Owns: q/k/v/o projections (HF names and layout), splitting heads, rotary, and handing the step to
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
        self.sm_scale = c.head_dim**-0.5
        self.attention_fn = attention_fn
        qkv = dict(use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, **qkv)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **qkv)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, **qkv)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, use_bias=c.o_proj_bias, dtype=dtype,
                             rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)  # shared by every head
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_norm_eps, dtype=dtype)
        self.qk_norm = c.qk_norm

    def __call__(
        self,
        x: jax.Array,  # [T, D]
        rope: tuple[jax.Array, jax.Array],  # cos, sin [T, H] float32
        kv_cache: jax.Array,  # [2, P, S, K, H]
        md: AttentionMetadata,
    ) -> tuple[jax.Array, jax.Array]:
        with jax.named_scope("attention"):
            t = x.shape[0]
            q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)  # [T, N, H]
            k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
            v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)  # [T, K, H]
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            out, kv_cache = self.attention_fn(
                q, k, v, kv_cache, md, sm_scale=self.sm_scale, sliding_window=self.sliding_window
            )  # [T, N, H]
            return self.o_proj(out.reshape(t, -1)), kv_cache  # [T, D]
