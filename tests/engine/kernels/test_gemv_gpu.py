"""The one-row GEMV kernel (engine.pallas_kernels.gemv_gpu) against its plain-JAX reference.

Owns: every epilogue (a folded norm's 1/rms, bias, act(gate) x up, rope, residual) in the Pallas
interpreter on fresh random inputs, the same at Llama-3.1-8B's shapes compiled on a GPU (`gpu`
mark), the tiling rules and the backend choice. Must not: test a model (test_llama_family.py runs
a model's one-row steps on it against transformers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.pallas_kernels import dispatch
from engine.pallas_kernels.gemv_gpu import GemvBlocks, RowGemv, blocks_for, gemv, gemv_reference

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
EPS = 1e-5
EPILOGUES = {
    "plain": {},
    "rms": dict(rms_eps=EPS),
    "rms+bias+silu": dict(rms_eps=EPS, bias=True, act=jax.nn.silu),
    "gelu_tanh": dict(act=lambda g: jax.nn.gelu(g, approximate=True)),
    "bias+residual": dict(bias=True, residual=True),
    "rms+bias+rope": dict(rms_eps=EPS, bias=True, rope=True),
}
HEAD = 32  # the rope cases' head dim


def _inputs(seed, n, k, dtype, epilogue):
    """x [1, K], w [N, K] and the kernel's keyword arguments, all fresh from `seed`."""
    kx, kw, kb, kr = jax.random.split(jax.random.key(seed), 4)
    x = (3.0 * jax.random.normal(kx, (1, k))).astype(dtype)  # rms far from 1, so a wrong scale shows
    w = (jax.random.normal(kw, (n, k)) * k**-0.5).astype(dtype)
    kwargs = dict(EPILOGUES[epilogue])
    out_n = n // 2 if "act" in kwargs else n
    if kwargs.pop("bias", False):
        kwargs["bias"] = jax.random.normal(kb, (n,)).astype(dtype)
    if kwargs.pop("residual", False):
        kwargs["residual"] = jax.random.normal(kr, (1, out_n)).astype(dtype)
    if kwargs.pop("rope", False):  # a position's angles; the last heads (v) pass
        head = 128 if n % 128 == 0 and n > 1024 else HEAD
        half = jax.random.uniform(kr, (1, head // 2), maxval=2 * np.pi)
        angles = jnp.concatenate([half, half], axis=-1)  # [1, H], HF's layout
        kwargs["rope"] = (jnp.cos(angles), jnp.sin(angles))
        kwargs["rope_heads"] = max(n // head - 2, 1)
    return x, w, kwargs


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("n,k,blocks", [(64, 512, GemvBlocks(16, 128)), (96, 192, GemvBlocks(8, 64))])
def test_interpreted_kernel_matches_reference(epilogue, dtype, tol, n, k, blocks):
    seed = np.random.SeedSequence().entropy % (1 << 31)  # fresh inputs every run; the seed is reported
    x, w, kwargs = _inputs(seed, n, k, dtype, epilogue)
    got = gemv(x, w, blocks=blocks, interpret=True, **kwargs)
    want = gemv_reference(x, w, **kwargs)
    assert got.shape == want.shape == (1, n // 2 if "act" in kwargs else n) and got.dtype == dtype
    if "rope" in kwargs:  # the rotation moved q/k and left v alone
        plain = gemv_reference(x, w, **{a: b for a, b in kwargs.items() if not a.startswith("rope")})
        v = slice(kwargs["rope_heads"] * HEAD, None)
        assert _rel(got[:, :v.start], plain[:, :v.start]) > 0.1 and _rel(got[:, v], plain[:, v]) < tol
    assert _rel(got, want) < tol, f"seed {seed}"


def test_row_gemv_refuses_a_weight_no_tiling_fits():
    row = RowGemv(interpret=True)
    assert row.supports(64, 96) and not row.supports(64, 100) and not row.supports(6, 64)
    with pytest.raises(ValueError, match="no GEMV tiling"):
        row(jnp.ones((1, 100)), jnp.ones((64, 100)))
    with pytest.raises(ValueError, match="does not tile"):  # 9 rows: no equal gate and up halves
        gemv(jnp.ones((1, 64)), jnp.ones((9, 64)), act=jax.nn.silu, blocks=GemvBlocks(4, 64), interpret=True)
    with pytest.raises(ValueError, match="one row"):
        gemv(jnp.ones((2, 64)), jnp.ones((16, 64)), blocks=GemvBlocks(16, 64), interpret=True)


def test_tilings():
    h100 = "NVIDIA H100 80GB HBM3"
    assert blocks_for(28672, 4096, gated=True, device_kind=h100) == GemvBlocks(8, 1024, 8, 2)
    assert blocks_for(4096, 14336, device_kind=h100) == GemvBlocks(8, 512, 4, 3)
    assert blocks_for(4096, 14336, device_kind="NVIDIA A100") == GemvBlocks(16, 512, 8, 3)  # untuned
    assert blocks_for(1728, 576) == GemvBlocks(16, 64, 4, 3)  # SmolLM2's MLP: K = 9 x 64
    assert blocks_for(20, 64, gated=True) is None  # 10 rows per half
    assert blocks_for(64, 32, rope_dim=8) == GemvBlocks(4, 32, 4, 3)  # half-heads of 4 rows
    assert blocks_for(6144, 4096, rope_dim=128, device_kind=h100) == GemvBlocks(8, 512, 8, 3)
    assert blocks_for(96, 64, rope_dim=12) is None  # half-heads of 6 rows
    for n, k, gated in ((6144, 4096, False), (4096, 4096, False), (1152, 576, True)):
        b = blocks_for(n, k, gated=gated)
        assert (n // (2 if gated else 1)) % b.block_n == 0 and k % b.block_k == 0


def test_dispatch_runs_row_gemv_on_gpu_only():
    assert dispatch.row_gemv_for("cpu") is None
    assert dispatch.row_gemv_for("gpu", backend="reference") is None
    assert isinstance(dispatch.row_gemv_for("gpu"), RowGemv)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        dispatch.row_gemv_for("cpu", backend="pallas")


# Llama-3.1-8B's four projections with the epilogues a layer gives them, at the tuned tilings.
@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("n,k,epilogue", [(6144, 4096, "rms+bias+rope"), (4096, 4096, "bias+residual"),
                                          (28672, 4096, "rms+bias+silu"), (4096, 14336, "bias+residual")])
def test_compiled_kernel_matches_reference_on_gpu(n, k, epilogue):
    seed = np.random.SeedSequence().entropy % (1 << 31)
    x, w, kwargs = _inputs(seed, n, k, jnp.bfloat16, epilogue)
    row = RowGemv(device_kind=jax.devices()[0].device_kind)
    got = jax.jit(functools.partial(row, **kwargs))(x, w)
    want = gemv_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                          **{a: (b.astype(jnp.float32) if hasattr(b, "astype") else b) for a, b in kwargs.items()})
    assert _rel(got, want) < 1e-2, f"seed {seed}"
