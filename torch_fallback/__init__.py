"""The torch fallback: every causal LM transformers knows, served through PyTorch behind the engine interface.

Layout: `engine.TorchEngine` (admission, validation, detokenization, outputs, stats: what LLMEngine
does, for a transformers model), `sampler` (per-request token choice in torch), `cb_backend`
(transformers' continuous batching: its paged KV cache, scheduler and batched forward) and
`eager_backend` (one forward per request, for models transformers' continuous batching cannot run).
This file owns `is_supported`, the question the engine factory asks before loading anything.
Must not: import jax, or torch/transformers at module import (the factory imports this file).
"""

from __future__ import annotations

import functools


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else (value,))
    return frozenset(names)


def is_supported(architecture: str | None) -> bool:
    """Whether `architecture` is one of transformers' causal-LM classes (what the fallback serves)."""
    return architecture is not None and architecture in _causal_lm_classes()


def unsupported_message(architecture: str | None) -> str:
    if architecture is None:
        return (
            "config.json names no `architectures`, so there is no model class to load: add the "
            'transformers class name (e.g. "LlamaForCausalLM") to it.'
        )
    return (
        f"architecture {architecture!r} is not a causal language model that transformers knows: tgx "
        "generates text with causal LMs only (a Flax port, or any transformers *ForCausalLM / "
        "*LMHeadModel class through the torch fallback); encoders, seq2seq models and models that "
        "need custom code (auto_map) are not served."
    )
