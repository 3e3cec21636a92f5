"""Routing: which path a config.json takes, and the refusals (GPU-only quantization, non-causal LMs)."""

from __future__ import annotations

import json
import logging

import pytest

from engine import engine_factory
from engine.config import EngineConfig
from engine.engine_factory import FLAX, TORCH, UnservableModelError, preflight, route_model
from tests.torch_fallback.models import write_quantized_config
from torch_fallback import is_supported


def _cfg(arch: str | None, **extra) -> dict:
    return {"architectures": [arch] if arch else None, "model_type": "x", **extra}


def _quant(method: str, arch: str = "LlamaForCausalLM") -> dict:
    return _cfg(arch, quantization_config={"quant_method": method, "bits": 4})


def test_ported_architecture_takes_the_flax_path():
    route = route_model(_cfg("LlamaForCausalLM"))  # the real registry
    assert (route.path, route.architecture) == (FLAX, "LlamaForCausalLM")


@pytest.mark.parametrize(
    "arch", ["GPTNeoXForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM", "GPTJForCausalLM"]
)
def test_unported_causal_lm_takes_the_torch_path(arch):
    route = route_model(_cfg(arch))
    assert (route.path, route.architecture) == (TORCH, arch)
    assert arch in route.reason


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
@pytest.mark.parametrize("gpu", ["cuda", "rocm"])
def test_gpu_quantization_goes_to_torch_where_a_gpu_can_run_it(method, gpu):
    # Even for an architecture with a Flax port: the Flax loader reads no quantized tensors.
    route = route_model(_quant(method), gpu=lambda: gpu)
    assert route.path == TORCH and method in route.reason


@pytest.mark.parametrize(
    ("method", "label"),
    [("gptq", "GPTQ"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes"), ("eetq", "EETQ")],
)
def test_gpu_quantization_without_cuda_is_refused_with_one_clear_line(method, label, monkeypatch):
    monkeypatch.setattr(engine_factory, "gpu_backend", lambda: None)  # the default check, patched
    with pytest.raises(UnservableModelError) as err:
        route_model(_quant(method))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{label}-quantized" in msg and f"quant_method = {method!r}" in msg  # which format
    assert "no GPU" in msg and "CUDA" in msg  # why
    assert "unquantized" in msg and "GGUF" in msg  # what to do
    assert isinstance(err.value, ValueError)  # every entry point's one-line handler catches it


def test_rocm_counts_only_for_formats_with_rocm_kernels():
    assert route_model(_quant("gptq"), gpu=lambda: "rocm").path == TORCH
    with pytest.raises(UnservableModelError, match="only ROCm"):
        route_model(_quant("eetq"), gpu=lambda: "rocm")


def test_legacy_bitsandbytes_flags_are_recognised():
    hf = _cfg("LlamaForCausalLM", quantization_config={"load_in_4bit": True})
    with pytest.raises(UnservableModelError, match="bitsandbytes"):
        route_model(hf, gpu=lambda: None)


@pytest.mark.parametrize("method", ["fp8", "compressed-tensors", "quanto"])
def test_quantization_that_runs_on_cpu_goes_to_torch_without_a_gpu(method):
    assert route_model(_quant(method), gpu=lambda: None).path == TORCH


@pytest.mark.parametrize("arch", ["BertModel", "T5ForConditionalGeneration", "MyCustomForCausalLM"])
def test_fallback_refuses_what_is_not_a_transformers_causal_lm(arch):
    assert not is_supported(arch)
    with pytest.raises(UnservableModelError) as err:
        route_model(_cfg(arch))
    assert repr(arch) in str(err.value) and "causal" in str(err.value)
    assert not is_supported(None)
    with pytest.raises(UnservableModelError, match="architectures"):
        route_model(_cfg(None))


def test_gguf_goes_to_the_flax_loader():
    assert route_model(_cfg("GPTNeoXForCausalLM"), is_gguf=True).path == FLAX


def test_preflight_refuses_gpu_quantization_and_leaves_the_rest_to_the_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_factory, "gpu_backend", lambda: None)
    quantized = write_quantized_config(tmp_path / "q", "awq")
    with pytest.raises(UnservableModelError, match="AWQ"):
        preflight(EngineConfig(model_id=str(quantized)))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(_cfg("GPTNeoXForCausalLM")))
    preflight(EngineConfig(model_id=str(plain)))
    preflight(EngineConfig(model_id=str(tmp_path / "missing")))  # the engine reports it, not preflight


def test_create_engine_refuses_before_loading_and_logs_the_route(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(engine_factory, "gpu_backend", lambda: None)
    with pytest.raises(UnservableModelError, match="GPTQ"):
        engine_factory.create_engine(EngineConfig(model_id=str(write_quantized_config(tmp_path, "gptq"))))
    built = []
    monkeypatch.setattr("torch_fallback.engine.TorchEngine", lambda cfg, **kw: built.append(kw) or "engine")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(_cfg("GPTNeoXForCausalLM")))
    with caplog.at_level(logging.INFO, logger="tgx.engine.factory"):
        assert engine_factory.create_engine(EngineConfig(model_id=str(plain))) == "engine"
    lines = [r.getMessage() for r in caplog.records if r.name == "tgx.engine.factory"]
    assert len(lines) == 1 and "GPTNeoXForCausalLM -> torch path (no Flax port" in lines[0]
    assert built[0]["hf_config"]["architectures"] == ["GPTNeoXForCausalLM"]
