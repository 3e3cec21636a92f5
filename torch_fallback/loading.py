"""Loading a transformers causal LM for the torch fallback, and the numbers the engine sizes itself with.

Owns: the device choice (CUDA when torch sees one, else CPU), the dtype, building the exact class
config.json names from its local files (never the network, never custom code), the tokenizer and
EOS ids (through engine.models.metadata, as the Flax path does), the KV bytes per token and the
memory budget for the KV cache. Must not: import jax, or let a loading failure escape as anything
but one ModelLoadError line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch

from engine.models import metadata
from engine.models.sources import ModelLoadError, ModelSource

log = logging.getLogger("tgx.torch_fallback")

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_MAX_POSITIONS = 4096  # for models whose config states no limit (recurrent ones)


@dataclasses.dataclass(frozen=True)
class TorchModel:
    model: Any  # a transformers PreTrainedModel in eval mode, on `device`
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    device: torch.device
    dtype: str
    vocab_size: int  # rows of the output embedding: the ids the model can emit


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:500]}" if text else type(e).__name__


def load(source: ModelSource, hf_config: dict[str, Any], dtype: str, progress=None) -> TorchModel:
    import transformers

    arch = (hf_config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelLoadError(
            f"transformers {transformers.__version__} has no class {arch!r} to load {source.display_name}"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.monotonic()
    tokenizer = metadata.load_tokenizer(source)
    eos = metadata.eos_token_ids(source, hf_config, tokenizer)
    if progress is not None:
        progress(0, 1, f"loading {source.display_name} with transformers ({arch}, {dtype}, {device.type})")
    try:
        model = cls.from_pretrained(
            str(source.directory),
            dtype=TORCH_DTYPES[dtype],
            device_map={"": device},
            local_files_only=True,
            trust_remote_code=False,
        )
    except Exception as e:  # transformers raises OSError/ValueError/ImportError/RuntimeError/...
        raise ModelLoadError(f"Could not load {source.display_name} with transformers: {_one_line(e)}") from e
    model.eval()
    out = model.get_output_embeddings()
    vocab = int(out.weight.shape[0]) if out is not None else int(model.config.get_text_config().vocab_size)
    if progress is not None:
        progress(1, 1, f"loaded {source.display_name}")
    log.info("Loaded %s (%s) on %s in %.1fs", source.display_name, arch, device, time.monotonic() - start)
    return TorchModel(model, tokenizer, eos, device, dtype, vocab)


def max_positions(model) -> int:
    text = model.config.get_text_config()
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else DEFAULT_MAX_POSITIONS


def kv_bytes_per_token(model, dtype: str) -> int:
    """Keys and values of one token over every layer (an estimate for models with other state)."""
    text = model.config.get_text_config()
    layers = int(getattr(text, "num_hidden_layers", 1) or 1)
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads or 1
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else text.hidden_size)
    return 2 * layers * int(kv_heads) * int(head_dim) * TORCH_DTYPES[dtype].itemsize


def kv_memory_budget(device: torch.device, memory_fraction: float) -> tuple[int, bool]:
    """Bytes the KV cache may take once the weights are loaded, and whether it is an accelerator."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Keep a tenth back for activations and the [tokens, vocab] logits, as the Flax engine does.
        used = total - free
        return max(int(total * memory_fraction) - used - total // 10, 0), True
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * memory_fraction) // 2, False
