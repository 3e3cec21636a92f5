"""Which kernels a platform runs: the ragged paged attention, and the one-row GEMV.

Owns: `attention_fn_for`, `row_gemv_for` and the backend names (`--attention-backend`'s values).
Must not: import a kernel's internals or read anything but its arguments and one env variable.

`auto` picks the Pallas GPU kernels on NVIDIA GPUs and the pure-JAX reference (XLA's dots for
projections) everywhere else; `reference` forces the reference (e.g. to compare, or to step around
a kernel problem); `pallas` demands the GPU kernels. TGX_ATTENTION_BACKEND sets the default when no
backend is passed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import jax

from engine.pallas_kernels.gemv_gpu import RowGemv
from engine.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from engine.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu

BACKENDS = ("auto", "reference", "pallas")
_STATIC = ("sm_scale", "sliding_window", "soft_cap", "block_sizes", "interpret", "num_q_heads")


def _traced_once(fn: Callable[..., tuple]) -> Callable[..., tuple]:
    """`fn` under its own jit: every layer of a model calls it with the same shapes, so the model's
    program traces and lowers it once instead of once per layer (a Pallas kernel's lowering is the
    slow part of building a program: 32 layers took ~10x the trace+lower time). XLA inlines the
    call, so the compiled program is the same."""
    static = tuple(n for n in _STATIC if n in inspect.signature(fn).parameters)
    return jax.jit(fn, static_argnames=static)


REFERENCE = _traced_once(ragged_paged_attention)
PALLAS_GPU = _traced_once(ragged_paged_attention_gpu)
ENV_VAR = "TGX_ATTENTION_BACKEND"
_GPU_PLATFORMS = ("gpu", "cuda")


def _use_gpu_kernels(platform: str | None, backend: str | None) -> bool:
    backend = backend or os.environ.get(ENV_VAR) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    platform = platform or jax.default_backend()
    on_gpu = platform in _GPU_PLATFORMS
    if backend == "pallas" and not on_gpu:
        raise ValueError(f"the 'pallas' attention backend needs an NVIDIA GPU; this platform is {platform!r}")
    return on_gpu and backend != "reference"


def attention_fn_for(platform: str | None = None, backend: str | None = None) -> Callable[..., tuple]:
    """The attention function (an engine.models.base.AttentionFn) for `platform` under `backend`.

    `platform` defaults to jax's default backend.
    """
    return PALLAS_GPU if _use_gpu_kernels(platform, backend) else REFERENCE


def row_gemv_for(platform: str | None = None, backend: str | None = None) -> RowGemv | None:
    """The one-row GEMV kernel (an engine.models.base.RowGemvFn) for `platform` under `backend`, or
    None: the model then runs XLA's dots."""
    if not _use_gpu_kernels(platform, backend):
        return None
    return RowGemv(device_kind=jax.devices()[0].device_kind)
