"""The model registry: which HF architectures tgx runs, how their configs read, how to build them.

Owns: the map from HF `architectures[0]` to a port and that family's config quirks, building a
model (concretely or abstractly, for the loader), and the error for anything else. Must not: read
files or weights, or hold mutable state: the tables here are read-only.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from engine.models.base import AttentionFn, CausalLM
from engine.models.config import ModelConfig, RopeScaling
from engine.models.llama import LlamaForCausalLM
from engine.pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention


class UnsupportedArchitectureError(ValueError):
    def __init__(self, architecture: str | None) -> None:
        self.architecture = architecture
        what = f"architecture {architecture!r}" if architecture else "a config.json without `architectures`"
        super().__init__(f"unsupported {what}; supported: {', '.join(supported_architectures())}")


def _llama(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))  # HF Llama puts it on q/k/v and o alike
    return dict(attention_bias=bias, o_proj_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    return dict(sliding_window=hf.get("sliding_window"))  # every layer; null on newer Mistrals


def _qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    quirks: dict[str, Any] = dict(attention_bias=True)  # q/k/v always biased, o never
    if hf.get("use_sliding_window", False) and hf.get("sliding_window") is not None:
        n = hf["num_hidden_layers"]
        first_sliding = hf.get("max_window_layers", n)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(n)
        ]
        quirks.update(sliding_window=hf["sliding_window"], layer_types=tuple(layer_types))
    return quirks


def _qwen3(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    return dict(_qwen2(hf), attention_bias=bias, o_proj_bias=bias, qk_norm=True)


_Quirks = Callable[[Mapping[str, Any]], dict[str, Any]]
_FAMILIES: Mapping[str, tuple[type, _Quirks]] = types.MappingProxyType({
    "LlamaForCausalLM": (LlamaForCausalLM, _llama),  # Llama 2/3/3.1/3.2, SmolLM2
    "MistralForCausalLM": (LlamaForCausalLM, _mistral),
    "Qwen2ForCausalLM": (LlamaForCausalLM, _qwen2),  # Qwen2, Qwen2.5
    "Qwen3ForCausalLM": (LlamaForCausalLM, _qwen3),
})


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def is_supported(architecture: str) -> bool:
    return architecture in _FAMILIES


def _need(hf: Mapping[str, Any], key: str, where: str = "config.json") -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{where} lacks `{key}`")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    # HF precedence: legacy `rope_scaling` over transformers-5 `rope_parameters`; theta may sit in
    # either dict or at the top level.
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope parameters are not supported for this architecture")
    theta = params.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    theta = float(theta or hf.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, RopeScaling()
    where = "rope scaling parameters"
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(_need(params, "factor", where)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings")
            or hf.get("original_max_position_embeddings")
            or _need(hf, "max_position_embeddings")
        ),
    )


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Reads a config.json dict; an architecture not in the registry raises UnsupportedArchitectureError."""
    archs = hf.get("architectures") or [None]
    arch = archs[0]
    if arch not in _FAMILIES:
        raise UnsupportedArchitectureError(arch)
    hidden, heads = int(_need(hf, "hidden_size")), int(_need(hf, "num_attention_heads"))
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    theta, scaling = _rope(hf)
    fields: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=int(_need(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_need(hf, "intermediate_size")),
        num_layers=int(_need(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        hidden_act=str(hf.get("hidden_act", "silu")),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
    fields.update(_FAMILIES[arch][1](hf))
    return ModelConfig(**fields)


def build_model(
    config: ModelConfig, *, dtype: Any, rngs: nnx.Rngs, attention_fn: AttentionFn | None = None
) -> CausalLM:
    """A randomly initialized model of the config's architecture, params in `dtype`."""
    if config.architecture not in _FAMILIES:
        raise UnsupportedArchitectureError(config.architecture)
    port = _FAMILIES[config.architecture][0]
    attention_fn = attention_fn or ragged_paged_attention
    return port(config, dtype=jnp.dtype(dtype), rngs=rngs, attention_fn=attention_fn)


def build_abstract_model(
    config: ModelConfig, *, dtype: Any, attention_fn: AttentionFn | None = None
) -> CausalLM:
    """The model with ShapeDtypeStruct params, nothing allocated: fill it with params.assign_params."""
    return nnx.eval_shape(
        lambda: build_model(config, dtype=dtype, rngs=nnx.Rngs(0), attention_fn=attention_fn)
    )
