"""One-row projections for GPUs with their neighbours fused in: a Pallas (Triton) GEMV kernel.

Owns: `gemv`, y = epilogue(W x) for one row x, and `gemv_reference`, the same in plain JAX. The
epilogues are the ones a decoder layer puts around its projections:
- `rms_eps`: a norm folded into W (engine.models.fuse): every program sums x*x over the K columns it
  walks anyway (all of them: there is no split-K), so y is scaled by 1/rms without a launch of its
  own;
- `residual`: y + residual, the residual add after o_proj and down_proj;
- `gated`: W holds [gate; up] rows; y = act(gate) * up, the SiLU x up of a gated MLP;
- `rope`: W is a fused q/k/v projection of heads of H rows; the leading `rope_heads` heads (q and
  k) are rotated by cos/sin (HF's rotate_half, the whole head), the rest (v) pass through;
- `bias`.
Must not: pick itself (the caller decides when one row runs here) or handle more than one row.

Why: at one row XLA's dot reads the weight near the copy rate but splits K and sums the partials in
the fusion after it, and the norm's sum of squares, the residual add and SiLU x up are each a launch
of 1.3-1.7 us on a layer's critical path, as is rope (bench/RESULTS.md, 2026-11-23). Here a
layer's four projections are its only launches besides the attention's decode and merge kernels.

Each program owns `block_n` output rows (and, gated, the matching up rows; with rope, the rows
H/2 on in the same head, so each rotation pair meets in one program) and walks K in
`block_k` steps, multiplying on the FMA units (a one-row product gains nothing from tensor cores
and Triton's dot would pad it to 16 rows); the [block_n, block_k] float32 accumulator is reduced
over K once, after the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from engine.models.layers.rope import apply_rope
from engine.pallas_kernels.gemv_gpu.tuned_block_sizes import GemvBlocks, Pairing, fits, pairing_of


def _kernel(*refs, blocks: GemvBlocks, k_dim: int, pairing: Pairing | None, rms_eps: float | None, act,
            rope_heads: int | None, has_res: bool, has_bias: bool):
    x_ref, w_ref = refs[:2]
    rest = list(refs[2:])
    res_ref = rest.pop(0) if has_res else None
    bias_ref = rest.pop(0) if has_bias else None
    cos_ref, sin_ref = (rest.pop(0), rest.pop(0)) if rope_heads is not None else (None, None)
    (o_ref,) = rest
    bn, bk = blocks.block_n, blocks.block_k
    j = pl.program_id(0)
    if pairing is None:
        first = j * bn
    else:  # row blocks [first, first + bn) and [first + offset, ...) of period `period` rows
        per = pairing.offset // bn  # programs per period
        first = (j // per) * pairing.period + (j % per) * bn
    rows_a = pl.ds(pl.multiple_of(first, bn), bn)
    rows_b = pl.ds(pl.multiple_of(first + (pairing.offset if pairing else 0), bn), bn)

    def body(i, carry):
        acc_a, acc_b, ss = carry
        ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
        x = x_ref[:, ks].astype(jnp.float32)  # [1, BK]
        acc_a = acc_a + w_ref[rows_a, ks].astype(jnp.float32) * x  # [BN, BK]
        if pairing is not None:
            acc_b = acc_b + w_ref[rows_b, ks].astype(jnp.float32) * x
        if rms_eps is not None:
            ss = ss + x * x  # [1, BK]
        return acc_a, acc_b, ss

    zeros = jnp.zeros((bn, bk), jnp.float32)
    init = (zeros, zeros if pairing else jnp.zeros((1, 1), jnp.float32), jnp.zeros((1, bk), jnp.float32))
    acc_a, acc_b, ss = jax.lax.fori_loop(0, k_dim // bk, body, init)
    scale = jax.lax.rsqrt(jnp.sum(ss) / k_dim + rms_eps) if rms_eps is not None else None

    def finish(acc, rows):
        y = jnp.sum(acc, axis=1)[None, :]  # [1, BN]
        if scale is not None:
            y = y * scale
        if has_bias:
            y = y + bias_ref[:, rows].astype(jnp.float32)
        return y

    y = finish(acc_a, rows_a)
    if pairing is None:
        ys = [(y, rows_a)]
    elif act is not None:  # [gate; up]
        ys = [(act(y) * finish(acc_b, rows_b), rows_a)]
    else:  # rope, HF's rotate_half: the pair is (x_i, x_{i + H/2}) of one head
        y_b = finish(acc_b, rows_b)
        lo = pl.ds(pl.multiple_of(first % pairing.period, bn), bn)
        hi = pl.ds(pl.multiple_of(first % pairing.period + pairing.offset, bn), bn)
        rotated = first // pairing.period < rope_heads  # v's heads pass through
        cos_lo, sin_lo = cos_ref[:, lo], sin_ref[:, lo]  # [1, BN] float32
        cos_hi, sin_hi = cos_ref[:, hi], sin_ref[:, hi]
        ys = [(jnp.where(rotated, y * cos_lo - y_b * sin_lo, y), rows_a),
              (jnp.where(rotated, y_b * cos_hi + y * sin_hi, y_b), rows_b)]
    for y, rows in ys:
        if has_res:
            y = y + res_ref[:, rows].astype(jnp.float32)
        o_ref[:, rows] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rms_eps", "act", "rope_heads", "blocks", "interpret"))
def gemv(
    x: jax.Array,  # [1, K]
    w: jax.Array,  # [N, K] (HF layout); gated: [2F, K], gate rows first
    *,
    residual: jax.Array | None = None,  # [1, N] (gated: [1, F])
    bias: jax.Array | None = None,  # [N]
    rms_eps: float | None = None,
    act: Callable[[jax.Array], jax.Array] | None = None,
    rope: tuple[jax.Array, jax.Array] | None = None,  # cos, sin [1, H] float32, H the head dim
    rope_heads: int | None = None,  # rope: the leading heads rotated (q and k); the rest pass
    blocks: GemvBlocks,
    interpret: bool = False,
) -> jax.Array:
    """[1, N] (gated: [1, F]) in x's dtype; see the module docstring for the epilogues."""
    n, k = w.shape
    if x.shape != (1, k):
        raise ValueError(f"gemv takes one row of {k} columns, got {x.shape}")
    if act is not None and rope is not None:
        raise ValueError("a gated projection has no rotary heads")
    if (rope is None) != (rope_heads is None):
        raise ValueError("rope and rope_heads go together")
    rope_dim = rope[0].shape[-1] if rope is not None else None
    pairing = pairing_of(n, gated=act is not None, rope_dim=rope_dim)
    if not fits(n, k, blocks, pairing):
        raise ValueError(f"a [{n}, {k}] weight does not tile into {blocks} ({pairing})")
    out_n = n // 2 if act is not None else n
    args = [x, w]
    if residual is not None:
        args.append(residual.reshape(1, out_n))
    if bias is not None:
        args.append(bias.reshape(1, n))
    if rope is not None:
        args += [c.reshape(1, rope_dim).astype(jnp.float32) for c in rope]
    kernel = functools.partial(
        _kernel, blocks=blocks, k_dim=k, pairing=pairing, rms_eps=rms_eps, act=act, rope_heads=rope_heads,
        has_res=residual is not None, has_bias=bias is not None)
    programs = n // blocks.block_n // (2 if pairing else 1)
    return pl.pallas_call(
        kernel,
        grid=(programs,),
        out_shape=jax.ShapeDtypeStruct((1, out_n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="gemv_gated" if act is not None else "gemv_rope" if rope is not None else "gemv",
    )(*args)


def gemv_reference(x, w, *, residual=None, bias=None, rms_eps=None, act=None, rope=None, rope_heads=None):
    """`gemv` in plain JAX, float32 inside: x [1, K], w [N, K] -> [1, N or N/2] in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf @ w.astype(jnp.float32).T  # [1, N]
    if rms_eps is not None:
        y = y * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + rms_eps)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if act is not None:
        gate, up = jnp.split(y, 2, axis=-1)
        y = act(gate) * up
    if rope is not None:  # the model's own rotation (engine.models.layers.rope), on q and k only
        cos, sin = (c.astype(jnp.float32).reshape(1, -1) for c in rope)  # [1, H]
        heads = y.reshape(1, -1, cos.shape[-1])  # [1, n, H]
        keep = (jnp.arange(heads.shape[1]) < rope_heads)[None, :, None]
        y = jnp.where(keep, apply_rope(heads, cos, sin), heads).reshape(y.shape)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)
