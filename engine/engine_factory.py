"""Engine factory: which engine serves a model, decided from its config.json before any weight is read.

Owns: `route_model`, the one routing rule (a Flax port when there is one and the weights are plain;
the transformers/PyTorch fallback for every other causal LM and for quantized checkpoints), the
refusal of CUDA-only quantization formats where torch sees no GPU, `preflight` (the launcher's check
before it starts any process) and `create_engine`, the one place the engine server, the CLI and LLM
build an engine. Must not: import jax, torch or transformers at module import (the launcher imports
this file), read weights, or build either engine's internals itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from engine.config import EngineConfig
from engine.models.sources import ModelLoadError, ModelSource, resolve_model

log = logging.getLogger("tgx.engine.factory")

FLAX = "flax"
TORCH = "torch"


@dataclasses.dataclass(frozen=True)
class Route:
    path: str  # FLAX | TORCH
    architecture: str | None
    reason: str


class UnservableModelError(ModelLoadError, ValueError):
    """The model can be read but not served here; the message says which format or class, why, what to do.

    A ValueError too, so every entry point's "user mistake: one line, no traceback" handler takes it."""


@dataclasses.dataclass(frozen=True)
class _GpuFormat:
    label: str
    rocm: bool  # whether the format's kernels also build for AMD GPUs (torch.cuda on ROCm)


# Quantization formats whose kernels exist only for GPUs: transformers' quantizers for them need
# torch.cuda (exllama/marlin/bitsandbytes/... kernels), so on a machine without one loading fails
# deep inside transformers or, worse, falls back to something nobody asked for. Formats that also
# run on CPU (fp8 dequantized, compressed-tensors, quanto, torchao, mxfp4, ...) are not listed.
GPU_ONLY_QUANTIZATION: Mapping[str, _GpuFormat] = {
    "gptq": _GpuFormat("GPTQ", rocm=True),
    "awq": _GpuFormat("AWQ", rocm=True),
    "bitsandbytes": _GpuFormat("bitsandbytes", rocm=True),
    "eetq": _GpuFormat("EETQ", rocm=False),
    "vptq": _GpuFormat("VPTQ", rocm=False),
    "higgs": _GpuFormat("HIGGS", rocm=False),
    "spqr": _GpuFormat("SpQR", rocm=False),
    "fbgemm_fp8": _GpuFormat("FBGEMM FP8", rocm=False),
    "fp_quant": _GpuFormat("FP-Quant", rocm=False),
    "nvfp4": _GpuFormat("NVFP4", rocm=False),
}


def gpu_backend() -> str | None:
    """Where torch can run GPU kernels on this machine: "cuda", "rocm" or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def quant_method(hf_config: Mapping[str, Any]) -> str | None:
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    if method is None and isinstance(qc, Mapping) and (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
        method = "bitsandbytes"  # older bitsandbytes configs carry only the load_in_* flags
    return str(method or "unknown").lower()


def check_quantization(hf_config: Mapping[str, Any], gpu: Callable[[], str | None] | None = None) -> None:
    """Raises UnservableModelError when the weights need GPU kernels that this machine cannot run.

    gpu: the GPU check, gpu_backend (looked up at call time, so tests can monkeypatch it) by default.
    """
    method = quant_method(hf_config)
    fmt = GPU_ONLY_QUANTIZATION.get(method or "")
    if fmt is None:
        return
    have = (gpu or gpu_backend)()
    if have == "cuda" or (have == "rocm" and fmt.rocm):
        return
    needs = "an NVIDIA CUDA GPU" + (" or an AMD ROCm GPU" if fmt.rocm else "")
    found = "only ROCm" if have == "rocm" else "no GPU (torch.cuda.is_available() is false)"
    raise UnservableModelError(
        f"the model's weights are {fmt.label}-quantized (quantization_config.quant_method = {method!r}); "
        f"{fmt.label} kernels need {needs}, and torch sees {found} on this machine. "
        "Serve it on a machine with such a GPU, or use an unquantized (bfloat16/float16) or GGUF "
        "version of the model."
    )


def route_model(
    hf_config: Mapping[str, Any],
    *,
    is_gguf: bool = False,
    gpu: Callable[[], str | None] | None = None,
    has_flax_port: Callable[[str], bool] | None = None,
    torch_can_serve: Callable[[str | None], bool] | None = None,
) -> Route:
    """The path for a model with this config.json; raises UnservableModelError when neither can serve it.

    The callables default to the real checks (engine.models.registry, torch_fallback); tests pass stubs.
    """
    archs = hf_config.get("architectures") or [None]
    arch = archs[0]
    if is_gguf:
        # The Flax loader owns GGUF (dequantized with `gguf`); it names the ported architectures.
        return Route(FLAX, arch, "GGUF file, read by the Flax loader")
    if has_flax_port is None:
        from engine.models.registry import is_supported as has_flax_port
    if torch_can_serve is None:
        from torch_fallback import is_supported as torch_can_serve
    method = quant_method(hf_config)
    if method is not None:
        check_quantization(hf_config, gpu)
        reason = f"{method}-quantized weights, which the Flax loader cannot read"
    elif arch is not None and has_flax_port(arch):
        return Route(FLAX, arch, "Flax port")
    else:
        reason = f"no Flax port for {arch}"
    if not torch_can_serve(arch):
        from torch_fallback import unsupported_message

        raise UnservableModelError(unsupported_message(arch))
    return Route(TORCH, arch, reason)


def _hf_config(source: ModelSource) -> dict[str, Any]:
    from engine.models.metadata import read_hf_config

    return read_hf_config(source)


def preflight(cfg: EngineConfig) -> None:
    """Refuses, before any process starts, a local model whose quantization this machine cannot run.

    Only the cheap check: anything else (a missing model, an unknown class) is left to the engine
    process, which reports it with the same one-line message.
    """
    if cfg.model_id is None:
        return
    try:
        source = resolve_model(cfg.model_id, cfg.revision)
        hf = _hf_config(source) if source.kind == "dir" else {}
    except ModelLoadError:
        return
    check_quantization(hf)


def create_engine(cfg: EngineConfig, progress=None, *, random_weights: bool = False):
    """The engine for cfg.model_id: LLMEngine on the Flax path, TorchEngine on the fallback path.

    random_weights (benchmarks only): cfg.model_id is a config directory and the Flax model gets
    random weights made on the device, for shapes nobody downloads to measure speed.
    """
    source = resolve_model(cfg.model_id, cfg.revision)
    # A GGUF goes to the Flax loader unread: transformers parses the whole file for its config (~25 s).
    hf = {} if source.kind == "gguf" else _hf_config(source)
    route = route_model(hf, is_gguf=source.kind == "gguf")
    log.info(
        "model %s: architecture %s -> %s path (%s)",
        source.display_name,
        route.architecture or "?",
        route.path,
        route.reason,
    )
    if route.path == FLAX:
        from engine.llm_engine import LLMEngine

        if random_weights:
            log.warning("--random-weights: %s gets RANDOM weights (benchmarking only)", source.display_name)
        return LLMEngine(cfg, random_weights=random_weights, progress=progress)
    if random_weights:
        raise UnservableModelError(f"--random-weights needs a model with a Flax port; {route.reason}")
    from torch_fallback.engine import TorchEngine

    return TorchEngine(cfg, source=source, hf_config=hf, progress=progress)
