"""Model metadata: the HF config dict, the tokenizer (with its chat template) and the EOS token ids.

Owns: reading config.json / generation_config.json from a model directory, and, for a GGUF file,
getting config and tokenizer through transformers' own GGUF support (AutoConfig / AutoTokenizer with
`gguf_file=`), so GGUF metadata is interpreted exactly as transformers does; the one addition is
for Gemma GGUFs: <end_of_turn> as an EOS id, as Gemma's HF generation configs have it. Must not:
invent chat templates (a model without one refuses chat requests), read weights,
build models, or reach the network (everything is loaded with local_files_only).
Every failure is a ModelLoadError naming the file at fault.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.models.sources import ModelLoadError, ModelSource

logger = logging.getLogger(__name__)

# A GGUF names one EOS id (<eos>) where Gemma's HF generation_config also stops at <end_of_turn>,
# which ends every chat turn.
_GEMMA_END_OF_TURN = "<end_of_turn>"


def read_hf_config(source: ModelSource) -> dict[str, Any]:
    """The model's config as a config.json-style dict (for a GGUF: transformers' reading of its metadata)."""
    if source.kind == "dir":
        return _read_json(source.directory / "config.json", required=True)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            str(source.directory), gguf_file=source.gguf_file, local_files_only=True
        )
    except Exception as e:  # transformers raises ValueError/KeyError/OSError/... on an unusable GGUF
        raise ModelLoadError(f"Could not read the model config from GGUF file {source.gguf_path}: {e}") from e
    hf = config.to_dict()
    if not hf.get("architectures"):
        # GGUF metadata names the family (model_type) but not the HF class; the registry keys on both.
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf.get("model_type", ""))
        if cls:
            hf["architectures"] = [cls]
    return hf


def load_tokenizer(source: ModelSource) -> Any:
    """The transformers fast tokenizer, chat template included when the model ships one."""
    from transformers import AutoTokenizer

    arch = None
    if source.kind == "gguf":
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

        from engine.models.gguf_weights import GGUFFile

        where = f"GGUF file {source.gguf_path}"
        arch = GGUFFile(source.gguf_path).architecture
        kwargs: dict[str, Any] = {"gguf_file": source.gguf_file}
        # Without tokenizer_type, AutoTokenizer parses the file's whole metadata a second time (the
        # config read was the first) only to learn the model type: ~20 s for Gemma's 262k-token
        # vocabulary. Where the architecture names a tokenizer class (gemma3 -> GemmaTokenizer), it
        # is the class that parse would pick; elsewhere (llama) AutoTokenizer keeps its own choice.
        if TOKENIZER_MAPPING_NAMES.get(arch):
            kwargs["tokenizer_type"] = arch
    else:
        where = str(source.directory)
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((source.directory / n).is_file() for n in names):
            raise ModelLoadError(f"{where} has no tokenizer (no tokenizer.json or tokenizer_config.json).")
        kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True, **kwargs)
    except Exception as e:
        raise ModelLoadError(f"Could not load the tokenizer from {where}: {e}") from e
    if not getattr(tokenizer, "is_fast", True):
        raise ModelLoadError(f"The tokenizer in {where} has no fast (tokenizers) version; tgx needs one.")
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("The tokenizer of %s has no chat template: chat requests will be refused.", where)
    return tokenizer


def eos_token_ids(source: ModelSource, hf_config: dict[str, Any], tokenizer: Any) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present, else from the config, else from the tokenizer."""
    if source.kind == "dir":
        generation = _read_json(source.directory / "generation_config.json", required=False)
        ids = _as_ids(generation.get("eos_token_id"))
        if ids:
            return ids
    ids = _as_ids(hf_config.get("eos_token_id"))
    if ids and source.kind == "gguf" and str(hf_config.get("model_type", "")).startswith("gemma"):
        end_of_turn = tokenizer.convert_tokens_to_ids(_GEMMA_END_OF_TURN)
        if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
            ids = _as_ids([*ids, end_of_turn])
    if ids:
        return ids
    ids = _as_ids(getattr(tokenizer, "eos_token_id", None))
    if not ids:
        logger.warning(
            "%s declares no EOS token: generation stops only at max_new_tokens.", source.display_name
        )
    return ids


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(int(v) for v in values if v is not None))


def _read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path} does not exist.")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"Could not parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object.")
    return data
