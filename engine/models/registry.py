"""The model registry: which HF architectures tgx runs, how their configs read, how to build them.

Owns: the map from HF `architectures[0]` to a port and that family's config quirks, building a
model (concretely or abstractly, for the loader), and the error for anything else. Must not: read
files or weights, or hold mutable state: the tables here are read-only.
"""

from __future__ import annotations

import math
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
        why = f" ({_REFUSED[architecture]})" if architecture in _REFUSED else ""
        super().__init__(f"unsupported {what}{why}; supported: {', '.join(supported_architectures())}")


# Architectures people will try that we know and refuse, with the reason shown to them.
_REFUSED: Mapping[str, str] = types.MappingProxyType({
    "Gemma3ForConditionalGeneration": "Gemma 3 with its vision tower; tgx serves the text-only "
    "Gemma3ForCausalLM checkpoints (gemma-3-270m, gemma-3-1b) and GGUF files of any Gemma 3",
})


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


def _moe(hf: Mapping[str, Any], *, expert_size_key: str) -> dict[str, Any]:
    # Hub configs say num_experts (Qwen) or num_local_experts (Mixtral); transformers 5 writes
    # num_local_experts for both, so either name is read.
    experts = hf.get("num_experts") or hf.get("num_local_experts")
    if experts is None:
        raise ValueError("config.json lacks `num_experts` (or `num_local_experts`)")
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=int(_need(hf, "num_experts_per_tok")),
        moe_intermediate_size=int(_need(hf, expert_size_key)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
    )


def _mixtral(hf: Mapping[str, Any]) -> dict[str, Any]:
    # Every layer sparse; experts are intermediate_size wide; top-k weights always renormalized.
    moe = _moe(hf, expert_size_key="intermediate_size")
    return {**_mistral(hf), **moe, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": ()}


def _qwen2_moe(hf: Mapping[str, Any]) -> dict[str, Any]:
    quirks = dict(_qwen2(hf), attention_bias=bool(hf.get("qkv_bias", True)))
    if "layer_types" not in hf and "layer_types" in quirks:  # its own rule: even layers slide
        n, first_full = hf["num_hidden_layers"], hf.get("max_window_layers", hf["num_hidden_layers"])
        quirks["layer_types"] = tuple(
            "sliding_attention" if i % 2 == 0 and i < first_full else "full_attention" for i in range(n)
        )
    moe = _moe(hf, expert_size_key="moe_intermediate_size")
    shared = int(_need(hf, "shared_expert_intermediate_size"))
    return dict(quirks, **moe, shared_expert_intermediate_size=shared)


def _qwen3_moe(hf: Mapping[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias", False))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None  # every layer
    moe = _moe(hf, expert_size_key="moe_intermediate_size")
    return dict(attention_bias=bias, o_proj_bias=bias, qk_norm=True, sliding_window=window, **moe)


def _phi3(hf: Mapping[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    return dict(_mistral(hf), fused_qkv=True, fused_gate_up=True, partial_rotary_factor=float(partial))


def _gemma(hf: Mapping[str, Any], *, pattern: int, caps: tuple[float | None, float | None],
           max_len: int) -> dict[str, Any]:
    """Gemma 2/3: what they share. `pattern`: every pattern-th layer is global when the config
    does not list layer_types; `caps` and `max_len`: HF's defaults for the attention and final soft
    caps and for max_position_embeddings."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional attention (embedding models) is not supported: tgx serves causal LMs")
    n = int(_need(hf, "num_hidden_layers"))
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    bias = bool(hf.get("attention_bias", False))  # q/k/v and o alike
    attn_cap, final_cap = (hf.get(k, d) for k, d in zip(
        ("attn_logit_softcapping", "final_logit_softcapping"), caps, strict=True))
    return dict(
        norm_unit_offset=True,
        sandwich_norms=True,
        scale_embeddings=True,
        attention_bias=bias,
        o_proj_bias=bias,
        hidden_act=str(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=tuple(layer_types),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        max_position_embeddings=int(hf.get("max_position_embeddings") or max_len),
    )


def _gemma2(hf: Mapping[str, Any]) -> dict[str, Any]:
    return _gemma(hf, pattern=2, caps=(50.0, 30.0), max_len=8192)


def _gemma3(hf: Mapping[str, Any]) -> dict[str, Any]:
    pattern = int(hf.get("sliding_window_pattern") or 6)
    quirks = _gemma(hf, pattern=pattern, caps=(None, None), max_len=131_072)
    # HF Gemma 3 never soft-caps attention scores, whatever the config says.
    quirks.update(attn_logit_softcap=None, qk_norm=True)
    # Rotary per layer type: transformers 5 writes rope_parameters {full_attention: ..,
    # sliding_attention: ..}; older configs have rope_theta (global), rope_local_base_freq and a
    # legacy rope_scaling that applies to the global layers only.
    params = hf.get("rope_parameters") or {}
    if params and not any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("Gemma 3 rope_parameters must be per layer type (full_attention, sliding_attention)")
    full = {**(params.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
    full.setdefault("rope_theta", hf.get("rope_theta") or 1_000_000.0)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 10_000.0)
    (theta, scaling), (local_theta, local_scaling) = (_rope({**hf, "rope_scaling": d}) for d in (full, local))
    return dict(quirks, rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
                local_rope_scaling=local_scaling)


_Quirks = Callable[[Mapping[str, Any]], dict[str, Any]]
_FAMILIES: Mapping[str, tuple[type, _Quirks]] = types.MappingProxyType({
    "LlamaForCausalLM": (LlamaForCausalLM, _llama),  # Llama 2/3/3.1/3.2, SmolLM2
    "MistralForCausalLM": (LlamaForCausalLM, _mistral),
    "Qwen2ForCausalLM": (LlamaForCausalLM, _qwen2),  # Qwen2, Qwen2.5
    "Qwen3ForCausalLM": (LlamaForCausalLM, _qwen3),
    "MixtralForCausalLM": (LlamaForCausalLM, _mixtral),
    "Qwen2MoeForCausalLM": (LlamaForCausalLM, _qwen2_moe),  # Qwen1.5-MoE, Qwen2-MoE
    "Qwen3MoeForCausalLM": (LlamaForCausalLM, _qwen3_moe),
    "Phi3ForCausalLM": (LlamaForCausalLM, _phi3),  # Phi-3, Phi-3.5-mini, Phi-4-mini
    "Gemma2ForCausalLM": (LlamaForCausalLM, _gemma2),
    "Gemma3ForCausalLM": (LlamaForCausalLM, _gemma3),  # text-only Gemma 3 (270m, 1b; any GGUF)
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
    if rope_type == "longrope" or "long_factor" in params:  # early Phi-3 configs say "su" or "yarn"
        return theta, _longrope(hf, params)
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


def _longrope(hf: Mapping[str, Any], params: Mapping[str, Any]) -> RopeScaling:
    where = "longrope scaling parameters"
    # HF (Phi-3) prefers the top-level original length; factor defaults to the context extension
    # ratio, and the cos/sin scale to sqrt(1 + ln(factor) / ln(original)).
    original = int(
        hf.get("original_max_position_embeddings")
        or params.get("original_max_position_embeddings")
        or _need(hf, "max_position_embeddings")
    )
    factor = float(params.get("factor") or int(_need(hf, "max_position_embeddings")) / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling(
        rope_type="longrope",
        factor=factor,
        original_max_position_embeddings=original,
        short_factor=tuple(float(f) for f in _need(params, "short_factor", where)),
        long_factor=tuple(float(f) for f in _need(params, "long_factor", where)),
        attention_factor=float(attention),
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
    quirks = _FAMILIES[arch][1](hf)
    theta, scaling = (quirks["rope_theta"], quirks["rope_scaling"]) if "rope_theta" in quirks else _rope(hf)
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
    fields.update(quirks)
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
