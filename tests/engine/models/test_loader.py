"""Tests for load_model: safetensors directories, Hub ids, the embedded GGUF, dtypes and errors.

Tiny random Llama/Qwen2 checkpoints are written by transformers into tmp dirs and our loaded
parameters are compared with torch's state_dict; the embedded SmolLM2 GGUF is compared with what
transformers' own GGUF loader produces (the slow part, shared per session via tests/engine/conftest).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.models.loader import ModelLoadError, load_model, parse_dtype
from engine.models.sources import resolve_model
from tests.engine.models.checkpoints import (
    CHAT_TEMPLATE,
    assert_matches,
    block_network,
    fake_hub_cache,
    params_of,
    save_tiny,
)

torch = pytest.importorskip("torch")


def _expect_error(match: str, *args, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_model(*args, **kwargs)
    assert "\n" not in str(info.value).strip()
    return info.value


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("tiny_llama")
    return directory, save_tiny(directory, "llama")


# ----------------------------------------------------------------------------- dtype


def test_parse_dtype():
    import jax.numpy as jnp

    assert parse_dtype("bf16") == parse_dtype("BFloat16") == parse_dtype(jnp.bfloat16) == "bfloat16"
    assert parse_dtype("fp32") == parse_dtype(np.float32) == "float32"
    assert parse_dtype("fp16") == "float16"
    with pytest.raises(ValueError, match=r"choose one of .*bfloat16.*float32"):
        parse_dtype("int8")


def test_bad_dtype_is_a_load_error(tiny_llama):
    _expect_error(r"Unsupported dtype 'float64'", str(tiny_llama[0]), dtype="float64")


# ----------------------------------------------------------------------------- safetensors directories


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_float32_load_equals_torch_state_dict(tmp_path, caplog, family, tied):
    import jax

    from engine.models.params import named_params

    state_dict = save_tiny(tmp_path, family, tied=tied)
    calls = []
    with caplog.at_level(logging.INFO, logger="engine.models.loader"):
        loaded = load_model(str(tmp_path), dtype="float32", progress=lambda *a: calls.append(a))
    assert all(isinstance(p.get_value(), jax.Array) for p in named_params(loaded.model).values())
    assert_matches(loaded.model, state_dict, tied=tied)
    assert any("Loading weights:" in r.getMessage() for r in caplog.records)
    assert loaded.dtype == "float32" and loaded.config.tie_word_embeddings == tied
    assert loaded.eos_token_ids == (2,) == loaded.config.eos_token_ids
    assert loaded.tokenizer.chat_template == CHAT_TEMPLATE
    assert calls and calls[-1][0] == calls[-1][1] == len(params_of(loaded.model))


def test_sharded_checkpoint(tmp_path):
    state_dict = save_tiny(tmp_path, "llama", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_matches(load_model(str(tmp_path), dtype="float32").model, state_dict, tied=False)


def test_bf16_checkpoint(tmp_path):
    state_dict = save_tiny(tmp_path, "llama", dtype=torch.bfloat16)
    loaded = load_model(str(tmp_path))  # default dtype: bfloat16
    assert loaded.dtype == "bfloat16"
    assert {v.dtype.name for v in params_of(loaded.model).values()} <= {"bfloat16", "float32"}
    assert_matches(loaded.model, state_dict, tied=False)  # bf16 -> bf16 is exact
    assert_matches(load_model(str(tmp_path), dtype="fp32").model, state_dict, tied=False)


def test_load_by_hub_id_offline(tmp_path, monkeypatch, no_network, tiny_llama):
    directory, state_dict = tiny_llama
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    fake_hub_cache(tmp_path / "cache", "org/tiny-llama", directory)
    loaded = load_model("org/tiny-llama", dtype="float32")
    assert loaded.source.display_name == "org/tiny-llama"
    assert_matches(loaded.model, state_dict, tied=False)


def test_eos_ids_prefer_generation_config(tmp_path, tiny_llama):
    shutil.copytree(tiny_llama[0], tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    assert load_model(str(tmp_path / "m"), dtype="float32").eos_token_ids == (2, 4)


# ----------------------------------------------------------------------------- errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_and_corrupt_files(tmp_path, tiny_llama):
    src = tiny_llama[0]
    _expect_error("does not exist", str(tmp_path / "nowhere"))

    d = _copy(src, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(r"Could not read .*model.safetensors: it is truncated", str(d))

    d = _copy(src, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    _expect_error(r"No model.safetensors", str(d))

    d = _copy(src, tmp_path / "notokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    _expect_error(r"notokenizer has no tokenizer", str(d))

    d = _copy(src, tmp_path / "badconfig")
    (d / "config.json").write_text("{not json")
    _expect_error(r"Could not parse .*config.json", str(d))


def test_missing_shard(tmp_path):
    save_tiny(tmp_path, "llama", max_shard_size="20KB")
    next(iter(sorted(tmp_path.glob("model-*-of-*.safetensors")))).unlink()
    _expect_error(r"Weight shard .*model-00001-of-.* is missing", str(tmp_path))


def test_weights_that_do_not_match_the_config(tmp_path, tiny_llama):
    from safetensors.numpy import load_file, save_file

    src = tiny_llama[0]
    tensors = load_file(src / "model.safetensors")

    d = _copy(src, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, d / "model.safetensors")
    _expect_error(r"has no tensor model.norm.weight, which the config .*config.json", str(d))

    d = _copy(src, tmp_path / "unexpected")
    save_file({**tensors, "model.extra.weight": np.zeros(3, np.float32)}, d / "model.safetensors")
    _expect_error(r"model.safetensors holds tensor model.extra.weight, which the model", str(d))

    d = _copy(src, tmp_path / "shape")
    _rewrite_json(d / "config.json", intermediate_size=40)
    _expect_error(r"Tensor model.layers.0.mlp.\w+_proj.weight in .* has shape \(\d+, \d+\), but", str(d))


def test_tied_checkpoint_that_still_stores_the_head(tmp_path):
    from safetensors.numpy import load_file, save_file

    state_dict = save_tiny(tmp_path, "qwen2", tied=True)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file(
        {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, tmp_path / "model.safetensors"
    )
    assert_matches(load_model(str(tmp_path), dtype="float32").model, state_dict, tied=True)


def test_unsupported_architecture(tmp_path, tiny_llama):
    d = _copy(tiny_llama[0], tmp_path / "gpt2")
    _rewrite_json(d / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _expect_error(r"GPT2", str(d))


def test_truncated_gguf(tmp_path):
    source = resolve_model(None)
    with open(source.gguf_path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(4 << 20))
    _expect_error(
        r"Could not read .*cut.gguf: it is truncated or not a GGUF file", str(tmp_path / "cut.gguf")
    )


# ----------------------------------------------------------------------------- the embedded GGUF


@pytest.mark.slow
def test_gguf_tensors_equal_transformers(smollm2_f32, hf_smollm2):
    assert smollm2_f32.source.kind == "gguf" and smollm2_f32.dtype == "float32"
    state_dict = {k: v.detach().numpy() for k, v in hf_smollm2.state_dict().items()}
    assert_matches(smollm2_f32.model, state_dict, tied=True, atol=1e-6)


@pytest.mark.slow
def test_gguf_tokenizer_has_chat_template_and_eos(smollm2_f32):
    tok = smollm2_f32.tokenizer
    assert smollm2_f32.eos_token_ids == (2,) and tok.eos_token_id == 2
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert smollm2_f32.config.num_layers == 30 and smollm2_f32.config.tie_word_embeddings


def test_unpermute_qk_inverts_llama_cpp_permutation():
    from engine.models.gguf_weights import unpermute_qk

    def llama_cpp_permute(w, n_head):  # the permutation as llama.cpp's converter defines it
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, 4), 4), w)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w[:, 0], 4), 4), w[:, 0])
