"""ModelConfig: the static, hashable description of one model, built from a Hugging Face config.

Owns: reading HF `config.json` fields (under their family-specific names) into one flat frozen
dataclass that jit can take as static. Must not: read weights, touch devices, or know any family's
code: families are variants of the shared layers, selected by the fields here.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling, as in HF `rope_scaling`/`rope_parameters` (llama3, linear, ...)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


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
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @staticmethod
    def from_hf(hf: dict[str, Any]) -> ModelConfig:
        """Builds the config from a config.json dict (see engine.models.registry for the families)."""
        from engine.models.registry import config_from_hf  # the registry knows family quirks

        return config_from_hf(hf)
