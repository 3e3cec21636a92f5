"""The GPU ragged paged attention entry point: same contract as the reference, Pallas kernels inside.

Owns: `ragged_paged_attention_gpu` (checks, cache write, plan, the three kernels) and
`supports` (which shapes the kernels take). Must not: choose a backend for a platform (dispatch.py
does) or change the semantics of the reference it stands in for.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata
from engine.pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention, write_kv
from engine.pallas_kernels.ragged_paged_attention_gpu import kernel
from engine.pallas_kernels.ragged_paged_attention_gpu.plan import D_TOK, build_plan
from engine.pallas_kernels.ragged_paged_attention_gpu.tuned_block_sizes import (
    INTERPRET,
    BlockSizes,
    block_sizes_for,
)

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def supports(head_dim: int, dtype) -> bool:
    """Triton tiles need a power-of-two head dim of at least 16; other shapes use the reference."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and jnp.dtype(dtype) in map(jnp.dtype, _DTYPES)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array, n: int) -> None:
    if q.ndim != 3 or kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"expected q [T, N, H] and kv_cache [2, P, S, K, H]; got {q.shape}, {kv_cache.shape}")
    t, _, h = q.shape
    kh = kv_cache.shape[3]
    if k.shape != (t, kh, h) or v.shape != k.shape or kv_cache.shape[4] != h or n % kh or q.shape[1] < n:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, kv_cache {kv_cache.shape}")


def _dot_precision(dtype, interpret: bool):
    if dtype != jnp.float32:
        return None
    return jax.lax.Precision.HIGHEST if interpret else jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def _default_sizes(head_dim: int, dtype, interpret: bool) -> BlockSizes:
    if interpret:
        return INTERPRET
    return block_sizes_for(jax.devices()[0].device_kind, head_dim, jnp.dtype(dtype).name)


def ragged_paged_attention_gpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    num_q_heads: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """q [T, N, H], k/v [T, K, H], kv_cache [2, P, S, K, H] -> (out [T, N, H] in q's dtype, new cache).

    `interpret=True` runs the kernels in Pallas' CPU interpreter (tests); `block_sizes` overrides the
    tuned table (benchmarks). `num_q_heads`: q is a fused projection [T, N + 2K, H] whose first N
    heads are the queries and whose last 2K are k and v; the kernels read q in place (no copy), and a
    1-token bucket takes its k/v from there too.
    """
    t, n, h = q.shape[0], num_q_heads or q.shape[1], q.shape[2]
    _check_shapes(q, k, v, kv_cache, n)
    _, p, s, kh, _ = kv_cache.shape
    if not supports(h, kv_cache.dtype):
        return ragged_paged_attention(q, k, v, kv_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                                      soft_cap=soft_cap, num_q_heads=num_q_heads)
    sizes = block_sizes or _default_sizes(h, kv_cache.dtype, interpret)
    # A 1-token bucket of a fused q/k/v: the decode kernel writes k/v itself, read from the fused
    # array (at one row a separate scatter, and the stack of k and v it needs, cost a launch each).
    write = n if num_q_heads is not None and t == 1 and q.shape[1] == n + 2 * kh else None
    if write is None:
        kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
    sh = kernel.Shapes(
        num_tokens=t, num_kv_heads=kh, group=n // kh, head_dim=h, page_size=s,
        max_pages=md.page_table.shape[1], sm_scale=float(sm_scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        dot_precision=_dot_precision(kv_cache.dtype, interpret),
    )
    # A prefill block holds whole tokens: at least one token's q heads, and at least 16 rows.
    pre = sizes.prefill
    rows = max(pre.rows, sh.group_pow2)
    with jax.named_scope("attention"):
        plan = build_plan(md, block_tokens=rows // sh.group_pow2, sliding_window=sliding_window)
        qg = q.astype(kv_cache.dtype)  # [T, N(+2K), H]: q head g of kv head k is row k * G + g
        kv_flat = kv_cache.reshape(2, p * s, kh, h)  # [2, P*S, K, H]
        pre = dataclasses.replace(pre, rows=rows)
        m, l, acc, *new_cache = kernel.decode_attention(plan, md.page_table, qg, kv_flat, cfg=sizes.decode, sh=sh,
                                                        interpret=interpret, write=write,
                                                        slot_mapping=md.slot_mapping)
        if new_cache:
            kv_cache = new_cache[0].reshape(kv_cache.shape)
        dec = kernel.merge_splits(plan.counts, m, l, acc, dtype=qg.dtype, sh=sh, interpret=interpret)
        if plan.blocks.shape[1]:
            out = kernel.prefill_attention(plan, md.page_table, qg, kv_flat, cfg=pre, sh=sh, interpret=interpret)
            out = out.at[plan.decodes[D_TOK]].set(dec, mode="drop")  # unused items point at T: dropped
            # Tokens that see no key are in neither work list: their rows were never written.
            live = plan.bounds[1] > plan.bounds[0]  # [T]
            out = jnp.where(live[:, None, None, None], out, 0)
        else:
            # A bucket too small for a block (one token): its one decode item, if used, is token 0,
            # and the merge wrote 0 if not. The kernels' outputs are the attention output as is.
            out = dec
    return out.reshape(t, n, h).astype(q.dtype), kv_cache
