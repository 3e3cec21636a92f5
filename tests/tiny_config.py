"""A tiny Llama config directory (config.json + SmolLM2's tokenizer, no weights) for `--random-weights`.

Owns: writing it. Starting an engine from it skips torch, transformers' model classes and a
checkpoint (what build_tiny_llama costs), so tests of the serving plumbing start quickly. Must not:
import jax or torch.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from tests.support import smollm2_tokenizer_dir


def write_tiny_config(out: pathlib.Path) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = smollm2_tokenizer_dir()
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,  # build_tiny_llama's (transformers' default): the same compiled programs
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
