"""LlamaForCausalLM: the Llama-shaped decoder, assembled from the shared layers.

Owns: wiring embed -> L x (norm, attention, norm, MLP with residuals) -> final norm -> logits for
Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5/3, SmolLM2, Phi-3, the MoE families (Mixtral, Qwen2/3-MoE)
and Gemma 2/3, whose differences are all config (biases, rope scaling, sliding window, tied
embeddings, fused projections, per-layer MoE or dense MLP; Gemma's (1 + w) norms, extra norms around
attention and MLP, scaled embeddings, soft-capped logits, and a separate rotary for sliding
layers). Must not: contain layer math (engine.models.layers does) or read checkpoints
(engine.models.params does). Attribute names mirror the HF module tree so
state paths are HF state_dict names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from engine.models.base import AttentionFn, RowGemvFn
from engine.models.config import ModelConfig
from engine.models.layers.attention import Attention
from engine.models.layers.embed import Embed, vocab_logits
from engine.models.layers.linear import Linear
from engine.models.layers.mlp import GatedMLP
from engine.models.layers.moe import SparseMoE
from engine.models.layers.norm import RMSNorm
from engine.models.layers.rope import rope_cos_sin, rope_inv_freq
from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata
from engine.pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, attention_fn: AttentionFn, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        c = config
        norm = dict(eps=c.rms_norm_eps, dtype=dtype, unit_offset=c.norm_unit_offset)
        # Folded (engine.models.fuse): the norms feeding q/k/v and a dense MLP keep only 1/rms.
        self.fold_attn = c.folded_norms
        self.fold_mlp = c.folded_norms and not c.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(c.hidden_size, **norm, scale_only=self.fold_attn)
        self.self_attn = Attention(c, layer, attention_fn=attention_fn, dtype=dtype, rngs=rngs)
        # Llama: the norm before the MLP. Sandwich (Gemma 2/3): the norm of the attention output,
        # with the MLP between its own pre and post norms.
        self.sandwich_norms = c.sandwich_norms
        fold_post_attn = self.fold_mlp and not c.sandwich_norms
        self.post_attention_layernorm = RMSNorm(c.hidden_size, **norm, scale_only=fold_post_attn)
        if c.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, **norm, scale_only=self.fold_mlp)
            self.post_feedforward_layernorm = RMSNorm(c.hidden_size, **norm)
        if c.is_moe_layer(layer):
            self.mlp = SparseMoE(c, dtype=dtype, rngs=rngs)
        else:
            self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act, use_bias=c.mlp_bias,
                                dtype=dtype, rngs=rngs, fused=c.fused_gate_up)
        # Static, set by engine.models.base.set_row_gemv where can_run_row_gemv holds.
        self.row_gemv: RowGemvFn | None = None

    def can_run_row_gemv(self, row_gemv: RowGemvFn | None) -> bool:
        """Whether `row_gemv` can run this layer's one-row steps: norms folded into a fused q/k/v
        (no q/k norms) and a fused dense gate/up, no sandwich norms, and every weight tiles."""
        attn, mlp = self.self_attn, self.mlp
        if row_gemv is None or not (self.fold_attn and self.fold_mlp) or self.sandwich_norms:
            return False
        if not (attn.fused_qkv and not attn.qk_norm and isinstance(mlp, GatedMLP) and mlp.fused):
            return False
        projections = ((attn.qkv_proj, False), (attn.o_proj, False), (mlp.gate_up_proj, True), (mlp.down_proj, False))
        return all(row_gemv.supports(*p.weight.get_value().shape, gated=gated) for p, gated in projections)

    def _one_row(self, x, rope, kv_cache, md):
        """A step of one row (a lone decode) on the fused GEMVs: each norm's 1/rms, rope, both
        residual adds and act(gate) x up run inside the four projections, so the attention's decode
        and merge kernels are the layer's only other launches (each of those was a launch of
        1.3-1.7 us in a launch-bound step)."""
        attn, mlp, gemv = self.self_attn, self.mlp, self.row_gemv

        def bias(p):
            return None if p.bias is None else p.bias[...]

        with jax.named_scope("attention"):
            w = attn.qkv_proj.weight[...]  # [(N + 2K) * H, D]
            # Rope inside the projection where it turns whole heads (not a partial rotary).
            turn = rope[0].shape[-1] == attn.head_dim and gemv.supports(*w.shape, rope_dim=attn.head_dim)
            qkv = gemv(x, w, bias=bias(attn.qkv_proj), rms_eps=self.input_layernorm.eps, rope=rope if turn else None,
                       rope_heads=attn.num_heads + attn.num_kv_heads if turn else None)  # [1, (N + 2K) * H]
            out, kv_cache = attn.attend_fused(qkv, None if turn else rope, kv_cache, md)  # [1, N * H]
            x = gemv(out, attn.o_proj.weight[...], bias=bias(attn.o_proj), residual=x)  # [1, D]
        with jax.named_scope("mlp"):
            up = gemv(x, mlp.gate_up_proj.weight[...], bias=bias(mlp.gate_up_proj),
                      rms_eps=self.post_attention_layernorm.eps, act=mlp.act)  # [1, F]
            x = gemv(up, mlp.down_proj.weight[...], bias=bias(mlp.down_proj), residual=x)  # [1, D]
        return x, kv_cache

    def __call__(
        self, x: jax.Array, rope: tuple[jax.Array, jax.Array], kv_cache: jax.Array, md: AttentionMetadata
    ) -> tuple[jax.Array, jax.Array]:  # x [T, D] -> ([T, D], new cache)
        if self.row_gemv is not None and x.shape[0] == 1:
            return self._one_row(x, rope, kv_cache, md)
        if self.fold_attn:
            attn, kv_cache = self.self_attn(x, rope, kv_cache, md, self.input_layernorm.row_scale(x))
        else:
            attn, kv_cache = self.self_attn(self.input_layernorm(x), rope, kv_cache, md)
        if self.sandwich_norms:
            x = x + self.post_attention_layernorm(attn)
            mlp_norm = self.pre_feedforward_layernorm
        else:
            x = x + attn
            mlp_norm = self.post_attention_layernorm
        y = self.mlp(x, mlp_norm.row_scale(x)) if self.fold_mlp else self.mlp(mlp_norm(x))
        if self.sandwich_norms:
            y = self.post_feedforward_layernorm(y)
        return x + y, kv_cache


class LlamaModel(nnx.Module):
    def __init__(self, config: ModelConfig, *, attention_fn: AttentionFn, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        c = config
        scale = c.hidden_size**0.5 if c.scale_embeddings else None
        self.embed_tokens = Embed(c.vocab_size, c.hidden_size, dtype=dtype, rngs=rngs, scale=scale)
        self.layers = nnx.List([
            DecoderLayer(c, i, attention_fn=attention_fn, dtype=dtype, rngs=rngs) for i in range(c.num_layers)
        ])
        self.norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps, dtype=dtype, unit_offset=c.norm_unit_offset)
        max_len = c.max_model_len or c.max_position_embeddings
        # Static: each distinct rotary (one, or Gemma 3's global and local), and which one a layer uses.
        ropes = tuple(dict.fromkeys(c.rope_of(i) for i in range(c.num_layers)))
        self.inv_freqs = tuple(
            tuple(rope_inv_freq(c.rotary_dim, theta, scaling, max_len=max_len).tolist())
            for theta, scaling in ropes
        )
        self.rope_scales = tuple(scaling.attention_factor for _, scaling in ropes)
        self.layer_rope = tuple(ropes.index(c.rope_of(i)) for i in range(c.num_layers))

    def __call__(
        self, input_ids: jax.Array, kv_caches: tuple[jax.Array, ...], md: AttentionMetadata
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        x = self.embed_tokens(input_ids)  # [T, D]
        # Once per step, shared by every layer that uses it.
        ropes = [rope_cos_sin(md.positions, inv, scale)
                 for inv, scale in zip(self.inv_freqs, self.rope_scales, strict=True)]
        new_caches = []
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            with jax.named_scope(f"layers.{i}"):
                x, cache = layer(x, ropes[self.layer_rope[i]], cache, md)
            new_caches.append(cache)
        return self.norm(x), tuple(new_caches)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 attention_fn: AttentionFn = ragged_paged_attention) -> None:
        self.config = config
        self.model = LlamaModel(config, attention_fn=attention_fn, dtype=dtype, rngs=rngs)
        if not config.tie_word_embeddings:  # tied: no lm_head param at all, logits reuse the embedding
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                  rngs=rngs)

    def __call__(
        self, input_ids: jax.Array, kv_caches: tuple[jax.Array, ...], md: AttentionMetadata
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """input_ids [T] -> (hidden [T, D] after the final norm, new caches L x [2, P, S, K, H])."""
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"expected {self.config.num_layers} KV caches, got {len(kv_caches)}")
        return self.model(input_ids, kv_caches, md)

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [R, D] -> logits [R, V] float32."""
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = vocab_logits(hidden, self.lm_head.weight[...])  # [V, D] weight
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)
