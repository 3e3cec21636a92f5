"""Tiny Hugging Face checkpoints for loader tests: written by transformers, compared param by param.

Owns: writing tiny random Llama/Qwen2 models with a word-level tokenizer and chat template into a
directory, a fake offline Hub cache layout, a no-network guard, and comparing a loaded NNX model's
params with a torch state_dict. Must not: be used by the engine, or download anything.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(directory)


def save_tiny(directory: Path, family: str = "llama", *, tied: bool = False, dtype=None, **save_kw) -> dict:
    """Writes a tiny random model + tokenizer to `directory`; returns its state_dict as float32 numpy."""
    import torch
    import transformers

    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    else:
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # random norms and biases, so a mix-up between tensors cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, **save_kw)
    save_tokenizer(directory, config.vocab_size)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def save_spread_model(directory: Path, model_cls, config, *, seed: int, std: float):
    """Writes `model_cls(config)` with matrices drawn from N(0, std) (wider than transformers' init,
    so greedy decoding does not settle on one token) and a tokenizer of its vocabulary; returns it."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    model.save_pretrained(directory)
    save_tokenizer(directory, config.vocab_size)
    return model


def params_of(model) -> dict[str, np.ndarray]:
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(p) for p in path): np.asarray(v.get_value()) for path, v in flat}


def assert_matches(model, state_dict: dict, *, tied: bool, atol=0.0) -> None:
    ours = params_of(model)
    expected = {k: v for k, v in state_dict.items() if not (tied and k == "lm_head.weight")}
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name].astype(np.float32), value, atol=atol, rtol=0, err_msg=name)


def fake_hub_cache(cache: Path, repo_id: str, files_from: Path, commit: str = "0123abcd" * 5) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any socket connection fail the test: loading must work with the Hub unreachable."""

    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
