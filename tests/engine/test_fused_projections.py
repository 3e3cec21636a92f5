"""Fused q/k/v and gate/up projections with folded pre-norms (engine.models.fuse) through the
loaders and the engine.

Owns: when the engine fuses (engine.served_model), the random-weight loader's fused tensors
against its unfused ones, and a fused engine loaded from a checkpoint directory giving
transformers' greedy tokens. Fusing follows reading, so one checkpoint format covers all (the
safetensors MoE case is in tests/engine/models/test_moe.py). Must not: repeat the per-family parity runs (tests/engine/models
covers fused models there).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.loader import random_model  # noqa: E402
from engine.models.params import named_params  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.served_model import fuse_projections  # noqa: E402
from tests.engine.conftest import run_all  # noqa: E402
from tests.engine.test_kv_groups_engine import VOCAB, _hf_greedy, _save_model  # noqa: E402


def _params(loaded) -> dict[str, np.ndarray]:
    return {n: np.asarray(p.get_value()) for n, p in named_params(loaded.model).items()}


def _assert_fused_from(fused: dict, plain: dict, num_layers: int) -> None:
    """Every layer's fused matrices are its separate ones stacked by rows with the norm before them
    folded into their columns, that norm is gone, and nothing else moved."""
    for i in range(num_layers):
        for block, target, parts, norm in (("self_attn", "qkv_proj", "qkv", "input_layernorm"),
                                           ("mlp", "gate_up_proj", ("gate", "up"), "post_attention_layernorm")):
            prefix = f"model.layers.{i}.{block}."
            gamma = plain.pop(f"model.layers.{i}.{norm}.weight")
            want = np.concatenate([plain.pop(f"{prefix}{p}_proj.weight") for p in parts]) * gamma
            np.testing.assert_allclose(fused.pop(f"{prefix}{target}.weight"), want, rtol=1e-6)
    assert fused.keys() == plain.keys()
    for name, value in plain.items():
        np.testing.assert_array_equal(fused[name], value, err_msg=name)


def test_when_the_engine_fuses():
    on_cpu = EngineConfig()
    assert fuse_projections(on_cpu, None) is False  # auto: GPUs only
    assert fuse_projections(EngineConfig(fuse_projections=True), None) is True
    assert fuse_projections(EngineConfig(fuse_projections=True), mesh=object()) is False  # never split
    assert fuse_projections(EngineConfig(fuse_projections=False), None) is False


def test_random_weights_fuse_to_the_same_model(tmp_path):
    _save_model(tmp_path, "qwen2")  # only its config.json and tokenizer are read
    plain = random_model(str(tmp_path), dtype="float32", seed=3)
    fused = random_model(str(tmp_path), dtype="float32", seed=3, fuse_projections=True)
    assert fused.config.fused_qkv and fused.config.folded_norms and not plain.config.fused_qkv
    fused_params, plain_params = _params(fused), _params(plain)
    for i in range(plain.config.num_layers):  # Qwen2: q/k/v biases join too
        prefix = f"model.layers.{i}.self_attn."
        want = np.concatenate([plain_params.pop(f"{prefix}{p}_proj.bias") for p in "qkv"])
        np.testing.assert_array_equal(fused_params.pop(f"{prefix}qkv_proj.bias"), want)
    _assert_fused_from(fused_params, plain_params, plain.config.num_layers)


@pytest.mark.parametrize("row_gemv", [False, True])
def test_fused_engine_from_a_checkpoint_matches_transformers(tmp_path, monkeypatch, row_gemv):
    """The engine as one GPU runs it (fused, with the 1-token bucket), loading the checkpoint itself;
    row_gemv: its lone decodes on the fused GEMV kernel, as on a GPU (interpreted here)."""
    if row_gemv:
        from engine import llm_engine
        from engine.pallas_kernels.gemv_gpu import RowGemv

        monkeypatch.setattr(llm_engine, "row_gemv_for", lambda backend=None: RowGemv(interpret=True))
    hf = _save_model(tmp_path, "qwen2")
    engine = LLMEngine(EngineConfig(
        model_id=str(tmp_path), dtype="float32", max_batch_size=4, max_batch_prefill_tokens=32,
        max_total_tokens=128, page_size=4, max_top_n_tokens=0, enable_prefill_logprobs=False,
        min_token_bucket=64, fuse_projections=True, lone_decode_bucket=True,
    ))
    assert engine.loaded.config.fused_qkv and engine.limits.token_buckets[0] == 1
    assert "model.layers.0.self_attn.qkv_proj.weight" in named_params(engine.loaded.model)
    layers = engine.loaded.model.model.layers
    assert all((layer.row_gemv is not None) == row_gemv for layer in layers)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, VOCAB, size=n).tolist() for n in (40, 7, 23)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    together = run_all(engine, prompts, params)
    assert together == [_hf_greedy(hf, p)[:24] for p in prompts]
    assert run_all(engine, [prompts[1]], params)[0] == together[1]  # alone: the 1-token bucket


def test_fold_on_device_equals_fold_on_host():
    """Random weights are folded with jax.numpy on the device, checkpoints with numpy on the host:
    the same products, Gemma's 1 + weight included, and the norms leave the dict."""
    import dataclasses

    import jax.numpy as jnp

    from engine.models.config import ModelConfig
    from engine.models.fuse import fold_norms, folded_pairs

    rng = np.random.default_rng()
    base = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=16, intermediate_size=24,
                       num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    for config in (base, dataclasses.replace(base, norm_unit_offset=True, sandwich_norms=True)):
        host = {}
        for norm, proj in folded_pairs(config):
            host[norm] = rng.normal(size=16).astype(np.float32)
            host[proj] = rng.normal(size=(32 if "qkv" in proj else 48, 16)).astype(np.float32)
        want = {n: v * ((1.0 if config.norm_unit_offset else 0.0) + host[norm])
                for norm, n in folded_pairs(config) for v in [host[n]]}
        device = fold_norms({n: jnp.asarray(v) for n, v in host.items()}, config, jnp)
        folded = fold_norms(dict(host), config, np)
        assert folded.keys() == device.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_allclose(folded[name], value, rtol=1e-6)
            np.testing.assert_allclose(np.asarray(device[name]), value, rtol=1e-6)


def test_fold_refuses_a_projection_without_its_norm():
    from engine.models.config import ModelConfig
    from engine.models.fuse import fold_norms, folded_pairs

    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=4, intermediate_size=6,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2)
    norm, proj = folded_pairs(config)[0]
    with pytest.raises(ValueError, match=norm):
        fold_norms({proj: np.ones((8, 4), np.float32)}, config, np)
