"""Tiny random transformers models of architectures without a Flax port, saved with SmolLM2's tokenizer.

Owns: building them (config + random weights, larger than the default init so greedy decoding does
not collapse to one token) into a directory `tgx serve --model-id` and TorchEngine can load. Must
not: import jax.
"""

from __future__ import annotations

import json
import pathlib

from tests.support import smollm2_tokenizer_dir

# config kwargs per architecture: 2 layers, hidden 64, so a model saves and loads in well under a second
TINY = {
    "GPTNeoXForCausalLM": {
        "model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "max_position_embeddings": 1024,
    },
    "GPT2LMHeadModel": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024},
    "OPTForCausalLM": {
        "model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "ffn_dim": 128, "word_embed_proj_dim": 64, "max_position_embeddings": 1024,
    },
    # No transformers attention interface: served by the eager backend.
    "GPTJForCausalLM": {
        "model_type": "gptj", "n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 1024,
    },
}  # fmt: skip


def build_tiny(architecture: str, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    kwargs = dict(TINY[architecture])
    config = AutoConfig.for_model(
        kwargs.pop("model_type"),
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        **kwargs,
    )
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_quantized_config(out: pathlib.Path, quant_method: str) -> pathlib.Path:
    """A config.json (no weights) of a Llama quantized with `quant_method`: routing reads nothing else."""
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "quantization_config": {"quant_method": quant_method, "bits": 4, "group_size": 128},
    }
    (out / "config.json").write_text(json.dumps(config))
    return out
