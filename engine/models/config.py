"""ModelConfig: the static, hashable description of one model, built from a Hugging Face config.

Owns: reading HF `config.json` fields (under their family-specific names) into one flat frozen
dataclass that jit can take as static. Must not: read weights, touch devices, or know any family's
code: families are variants of the shared layers, selected by the fields here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling, as in HF `rope_scaling`/`rope_parameters` (llama3, linear, longrope, ...)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # LongRoPE (Phi-3): per-frequency divisors for short and long contexts, and the factor that
    # scales cos/sin (resolved from HF's defaults when the config leaves it out).
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        if self.rope_type == "longrope":
            if not self.short_factor or len(self.short_factor) != len(self.long_factor):
                raise ValueError("longrope scaling needs short_factor and long_factor lists of equal length")
            if min(self.short_factor + self.long_factor) <= 0 or self.attention_factor <= 0:
                raise ValueError("longrope factors and attention_factor must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    o_proj_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3)
    sliding_window: int | None = None
    # Per-layer "full_attention"/"sliding_attention" (HF `layer_types`). Empty: every layer slides
    # when sliding_window is set, so single-window families (Mistral) need not spell it out.
    layer_types: tuple[str, ...] = ()
    # Phi-3 checkpoints store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # The weights of the norms before attention and before a dense MLP are folded into the columns of
    # the projections they feed (engine.models.fuse); those norms compute only each row's 1/rms,
    # applied to the projections' outputs. Never set by a checkpoint: the engine's one-GPU layout.
    folded_norms: bool = False
    partial_rotary_factor: float = 1.0  # rotary covers the first head_dim * factor dims (Phi-4-mini)
    # The longest sequence served (prompt + generated); None: max_position_embeddings. LongRoPE
    # picks its factor set from it once, since cached keys cannot be re-rotated mid-request.
    max_model_len: int | None = None
    # Mixture of experts (0 experts: every layer is dense). A layer is sparse unless listed in
    # mlp_only_layers or off the decoder_sparse_step grid (Qwen2/3-MoE); dense layers use
    # intermediate_size, experts moe_intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen2-MoE has one)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Gemma 2/3 (all off for the Llama-shaped families).
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight), multiplied in float32
    sandwich_norms: bool = False  # norms after attention and around the MLP, as well as before
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), rounded to the param dtype
    query_pre_attn_scalar: float | None = None  # softmax scale is its -1/2 power (None: head_dim's)
    attn_logit_softcap: float | None = None  # attention scores become cap * tanh(score / cap)
    final_logit_softcap: float | None = None  # the same on the output logits
    # Rotary of the sliding-window layers when it differs from the full-attention layers' (Gemma 3:
    # a small theta locally, a large and possibly scaled one globally). None: the same for all.
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling = RopeScaling()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"unknown layer_types {bad}; supported: {', '.join(LAYER_TYPES)}")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} must give an even rotary dimension "
                f"in (0, head_dim {self.head_dim}]"
            )
        num_factors = len(self.rope_scaling.short_factor)
        if self.rope_scaling.rope_type == "longrope" and num_factors != self.rotary_dim // 2:
            raise ValueError(
                f"longrope factor lists have {num_factors} entries; the rotary dimension "
                f"{self.rotary_dim} needs {self.rotary_dim // 2}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive or None, got {self.max_model_len}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "local_rope_theta"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts "
                    f"({self.num_experts})]"
                )
            if self.moe_intermediate_size < 1 or self.decoder_sparse_step < 1:
                raise ValueError("moe_intermediate_size and decoder_sparse_step must be positive")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether this layer's feed-forward block is the sparse MoE one (else the dense MLP)."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def rope_of(self, layer: int) -> tuple[float, RopeScaling]:
        """(theta, scaling) of one layer's rotary: the local one on sliding layers when it is set."""
        sliding = self.layer_types[layer] == "sliding_attention" if self.layer_types else (
            self.sliding_window is not None)
        if sliding and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    def sliding_window_for(self, layer: int) -> int | None:
        """The attention window of one layer (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def kv_cache_windows(self) -> tuple[int | None, ...]:
        """One KV cache group per distinct layer window, full attention (None) first, then the
        windows ascending. Each group has its own page pool, so a sliding group frees its pages."""
        windows = {self.sliding_window_for(i) for i in range(self.num_layers)}
        return tuple(sorted(windows, key=lambda w: -1 if w is None else w))

    def kv_group_of(self, layer: int) -> int:
        """The index in kv_cache_windows() of the group that holds this layer's KV cache."""
        return self.kv_cache_windows().index(self.sliding_window_for(layer))

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> ModelConfig:
        """Builds the config from a config.json dict (see engine.models.registry for the families)."""
        from engine.models.registry import config_from_hf  # the registry knows family quirks

        return config_from_hf(hf)
