"""The three Pallas kernels (Triton lowering) of the GPU ragged paged attention, and their launches.

Owns: the prefill kernel (a query block and kv head per step; finishes its softmax and writes the
output), the decode kernel (a decode token, KV split and kv head per step; writes
flash-decoding partials) and the merge kernel (one decode token's splits, per kv head), with
`combine`, the merge in plain JAX that the merge kernel is tested against. Must not: plan work
(plan.py does) or write the cache, except the decode kernel's write of a 1-token bucket's k/v
(`write`), which the caller asks for in place of its scatter.

Grids are static: at most `programs` programs (per the tuned sizes), each looping over the used
entries of its work list (p, p + n, ...), so unused capacity costs one early exit, not a launch.

Both read K/V straight from the paged cache: a KV block of `block_kv` positions is gathered slot by
slot through the request's page table, so any page size works. All q heads of a kv head are rows of
one dot ([rows, H] x [H, block_kv]), so each K/V block is read once per kv head. Blocks that every
row sees in full run without masks; only edge blocks (causal diagonal, window start, context end)
pay for them. Logits are kept in base 2 (scale folded with log2 e) so the softmax uses exp2.

Every load and store is indexed with integer arrays (no slices): the CPU interpreter handles that
form, and Triton still sees contiguous head-dim runs. Stores of rows that do not exist point past
the end of their array: masked on GPU, dropped by the interpreter's scatter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from engine.pallas_kernels.ragged_paged_attention_gpu import plan as plan_lib
from engine.pallas_kernels.ragged_paged_attention_gpu.tuned_block_sizes import DecodeBlocks, PrefillBlocks

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Static facts of one call shared by both kernels."""

    num_tokens: int  # T
    num_kv_heads: int  # K
    group: int  # G, q heads per kv head
    head_dim: int  # H
    page_size: int  # S
    max_pages: int  # Pmax
    sm_scale: float
    soft_cap: float | None
    # None for 16-bit caches; for float32 never plain tf32: 3 x tf32 on GPU (float32-grade and on
    # tensor cores), exact float32 in the interpreter (the CPU has no tf32 algorithms).
    dot_precision: jax.lax.Precision | jax.lax.DotAlgorithmPreset | None

    @property
    def group_pow2(self) -> int:
        return 1 << (self.group - 1).bit_length()


def _logits(q, k, sh: Shapes):
    """q [M, H], k [B, H] -> base-2 logits [M, B] float32."""
    s = plgpu.dot(q, k, trans_b=True, precision=sh.dot_precision)
    if sh.soft_cap is None:
        return s * (sh.sm_scale * _LOG2E)
    return jnp.tanh(s * (sh.sm_scale / sh.soft_cap)) * (sh.soft_cap * _LOG2E)


def _attend(q, row_lo, row_hi, kv_lo, kv_hi, blk_begin, blk_end, row, kh, pt_ref, kv_ref, *, block_kv,
            prefetch, sh, new=None):
    """Online softmax of q [M, H] over KV blocks [blk_begin, blk_end) of request `row`, kv head kh.

    Row i sees positions [row_lo[i], row_hi[i]); every row lies inside [kv_lo, kv_hi). Returns base-2
    running max m [M], denominator l [M] and unnormalized output acc [M, H], all float32.
    `prefetch`: the unmasked loop reads the next block's page ids one step ahead, so K/V addresses
    do not wait on a load of the same step and Triton can buffer K/V several stages deep.
    `new`: (slot, k [1, H], v [1, H]) of a token this launch is writing into the cache: its slot is
    read from these values, never from the cache, which another program may be writing meanwhile.
    """
    m_rows, h = q.shape
    col = jnp.arange(h, dtype=jnp.int32)[None, :]  # [1, H]
    # Blocks inside every row's range need no mask: [full_lo, full_hi) is their intersection.
    full_lo, full_hi = jnp.max(row_lo), jnp.min(row_hi)
    u0 = jnp.clip((full_lo + block_kv - 1) // block_kv, blk_begin, blk_end)
    u1 = jnp.clip(full_hi // block_kv, u0, blk_end)

    def slots(b):
        j = b * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [B]
        page = pt_ref[row, jnp.minimum(j // sh.page_size, sh.max_pages - 1)]  # [B]
        return (page * sh.page_size + j % sh.page_size)[:, None]  # [B, 1]

    def step(b, carry, masked, slot):
        m_i, l_i, acc = carry  # [M], [M], [M, H]
        j = b * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [B]
        if masked:
            in_kv = jnp.broadcast_to(((j >= kv_lo) & (j < kv_hi))[:, None], (block_kv, h))  # [B, H]
            k = plgpu.load(kv_ref.at[0, slot, kh, col], mask=in_kv, other=0)  # [B, H]
        else:
            k = kv_ref[0, slot, kh, col]  # [B, H]
        if new is not None:
            k = jnp.where(slot == new[0], new[1], k)
        s = _logits(q, k, sh)  # [M, B]
        if masked:
            sees = (j[None, :] >= row_lo[:, None]) & (j[None, :] < row_hi[:, None])  # [M, B]
            s = jnp.where(sees, s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))  # [M]
        # Rows that have seen nothing keep m = -inf; shift by 0 there so exp2 never sees inf - inf.
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m_i - m_use)  # [M]
        p = jnp.exp2(s - m_use[:, None])  # [M, B]
        if masked:
            v = plgpu.load(kv_ref.at[1, slot, kh, col], mask=in_kv, other=0)
        else:
            v = kv_ref[1, slot, kh, col]
        if new is not None:
            v = jnp.where(slot == new[0], new[2], v)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=sh.dot_precision)  # [M, H]
        return m_new, l_i * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + pv

    carry = (
        jnp.full((m_rows,), -jnp.inf, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
        jnp.zeros((m_rows, h), jnp.float32),
    )

    if prefetch:
        def inner(b, c):
            *c, slot = c
            return (*step(b, c, False, slot), slots(b + 1))

        *carry, _ = jax.lax.fori_loop(u0, u1, inner, (*carry, slots(u0)))
    else:
        carry = jax.lax.fori_loop(u0, u1, lambda b, c: step(b, c, False, slots(b)), carry)
    n_head = u0 - blk_begin  # masked blocks before the unmasked stretch, then those after it

    def edge(i, c):
        b = jnp.where(i < n_head, blk_begin + i, u1 + i - n_head)
        return step(b, c, True, slots(b))

    return jax.lax.fori_loop(0, n_head + blk_end - u1, edge, tuple(carry))


def _block_range(kv_lo, kv_hi, block_kv):
    blk_begin = kv_lo // block_kv
    return blk_begin, jnp.where(kv_hi > kv_lo, (kv_hi + block_kv - 1) // block_kv, blk_begin)


def _num_items(used, first, stride):
    """Items first, first + stride, ... below `used`: how many a persistent program runs."""
    return (jnp.maximum(used - first, 0) + stride - 1) // stride


def _prefill_kernel(counts_ref, blocks_ref, bounds_ref, pt_ref, q_ref, kv_ref, o_ref, *, cfg, sh, programs):
    kh, p = pl.program_id(0), pl.program_id(1)
    used = counts_ref[0]
    gp, t_len = sh.group_pow2, sh.num_tokens
    r = jnp.arange(cfg.rows, dtype=jnp.int32)
    col = jnp.arange(sh.head_dim, dtype=jnp.int32)[None, :]

    def one_block(i, carry):
        b = used - 1 - (p + i * programs)  # later blocks of a run see more keys: start them first
        row, tok0, ntok = (blocks_ref[f, b] for f in (plan_lib.ROW, plan_lib.TOK, plan_lib.NTOK))
        kv_lo, kv_hi = blocks_ref[plan_lib.KV_LO, b], blocks_ref[plan_lib.KV_HI, b]
        tok, g = tok0 + r // gp, r % gp  # [M]: row r is q head g of token tok
        valid = (r // gp < ntok) & (g < sh.group)
        tok_ld, g_ld = jnp.minimum(tok, t_len - 1), jnp.minimum(g, sh.group - 1)
        valid_2d = jnp.broadcast_to(valid[:, None], (cfg.rows, sh.head_dim))
        q = plgpu.load(q_ref.at[tok_ld[:, None], kh * sh.group + g_ld[:, None], col], mask=valid_2d, other=0)
        row_lo = jnp.where(valid, bounds_ref[0, tok_ld], 0)  # [M]: missing rows never narrow the
        row_hi = jnp.where(valid, bounds_ref[1, tok_ld], jnp.iinfo(jnp.int32).max)  # unmasked stretch
        blk_begin, blk_end = _block_range(kv_lo, kv_hi, cfg.block_kv)
        _, l, acc = _attend(q, row_lo, row_hi, kv_lo, kv_hi, blk_begin, blk_end, row, kh, pt_ref, kv_ref,
                            block_kv=cfg.block_kv, prefetch=cfg.prefetch_pages, sh=sh)
        # Rows that saw no key (padding, empty windows) give 0, never NaN.
        out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
        tok_st = jnp.where(valid, tok, t_len)[:, None]
        plgpu.store(o_ref.at[tok_st, kh, g_ld[:, None], col], out.astype(o_ref.dtype), mask=valid_2d)
        return carry

    jax.lax.fori_loop(0, _num_items(used, p, programs), one_block, 0)


def _decode_kernel(counts_ref, decodes_ref, pt_ref, q_ref, kv_ref, *refs, cfg, rows, sh, programs, write):
    """Writes partials m, l, acc per decode item, split and kv head.

    `write` (a 1-token bucket with a fused q/k/v: k's first head row in q): the launch also writes
    token 0's k and v into the cache (aliased in and out), from program (kh, 0, 0), in place of an
    XLA scatter and the fusion that stacks k and v for it.
    """
    kh, split, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    new = None
    if write is None:
        m_ref, l_ref, acc_ref = refs
    else:
        slots_ref, m_ref, l_ref, acc_ref, kv_out_ref = refs
        hcol = jnp.arange(sh.head_dim, dtype=jnp.int32)[None, :]  # [1, H]
        slot = slots_ref[0]
        k_new = q_ref[0, write + kh, hcol].astype(kv_out_ref.dtype)  # [1, H]
        v_new = q_ref[0, write + sh.num_kv_heads + kh, hcol].astype(kv_out_ref.dtype)
        first = jnp.broadcast_to((split == 0) & (p == 0), (1, sh.head_dim))
        plgpu.store(kv_out_ref.at[0, slot, kh, hcol], k_new, mask=first)
        plgpu.store(kv_out_ref.at[1, slot, kh, hcol], v_new, mask=first)
        new = (slot, k_new, v_new)
    r = jnp.arange(rows, dtype=jnp.int32)
    valid = r < sh.group  # rows past G pad the dot to Triton's minimum
    g_ld = jnp.minimum(r, sh.group - 1)[:, None]
    g_st = jnp.where(valid, r, sh.group)  # [M]
    col = jnp.arange(sh.head_dim, dtype=jnp.int32)[None, :]
    valid_2d = jnp.broadcast_to(valid[:, None], (rows, sh.head_dim))

    def one_item(i, carry):
        d = p + i * programs
        row, tok = decodes_ref[plan_lib.D_ROW, d], decodes_ref[plan_lib.D_TOK, d]
        kv_lo, kv_hi = decodes_ref[plan_lib.D_KV_LO, d], decodes_ref[plan_lib.D_KV_HI, d]
        q = plgpu.load(q_ref.at[jnp.minimum(tok, sh.num_tokens - 1), kh * sh.group + g_ld, col], mask=valid_2d,
                      other=0)  # [M, H]
        # This program's share of the context: whole blocks, at least min_split_blocks of them.
        blk_begin, blk_end = _block_range(kv_lo, kv_hi, cfg.block_kv)
        per = jnp.maximum((blk_end - blk_begin + cfg.num_splits - 1) // cfg.num_splits, cfg.min_split_blocks)
        s_begin = jnp.minimum(blk_begin + split * per, blk_end)
        s_end = jnp.minimum(s_begin + per, blk_end)
        row_lo, row_hi = jnp.full((rows,), kv_lo, jnp.int32), jnp.full((rows,), kv_hi, jnp.int32)
        m, l, acc = _attend(q, row_lo, row_hi, kv_lo, kv_hi, s_begin, s_end, row, kh, pt_ref, kv_ref,
                            block_kv=cfg.block_kv, prefetch=cfg.prefetch_pages, sh=sh, new=new)
        plgpu.store(m_ref.at[d, split, kh, g_st], m, mask=valid)
        plgpu.store(l_ref.at[d, split, kh, g_st], l, mask=valid)
        plgpu.store(acc_ref.at[d, split, kh, g_st[:, None], col], acc, mask=valid_2d)
        return carry

    jax.lax.fori_loop(0, _num_items(counts_ref[1], p, programs), one_item, 0)


def prefill_attention(plan, page_table, q, kv_flat, *, cfg: PrefillBlocks, sh: Shapes, interpret: bool):
    """q [T, N(+2K), H], kv_flat [2, P*S, K, H] -> out [T, K, G, H] (rows of decode items unwritten)."""
    # Persistent beyond cfg.programs: program p runs blocks p, p + n, ... of the used ones.
    programs = min(plan.blocks.shape[1], -(-cfg.programs // sh.num_kv_heads))
    kernel = functools.partial(_prefill_kernel, cfg=cfg, sh=sh, programs=programs)
    return pl.pallas_call(
        kernel,
        grid=(sh.num_kv_heads, programs),  # kv heads vary fastest: a block's heads run side by side
        out_shape=jax.ShapeDtypeStruct((sh.num_tokens, sh.num_kv_heads, sh.group, sh.head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="rpa_gpu_prefill",
    )(plan.counts, plan.blocks, plan.bounds, page_table, q, kv_flat)


def decode_attention(plan, page_table, q, kv_flat, *, cfg: DecodeBlocks, sh: Shapes, interpret: bool,
                     write: int | None = None, slot_mapping: jax.Array | None = None):
    """-> partials m, l [ND, splits, K, G] and acc [ND, splits, K, G, H], float32 (see combine).

    `write`: q is a fused [1, N + 2K, H] whose k rows start at head `write`; token 0's k/v go into
    the cache at slot_mapping[0], and the new kv_flat comes back as a fourth output (donated in).
    """
    nd = plan.decodes.shape[1]
    cfg = cfg.for_items(nd, sh.num_kv_heads)
    rows = max(16, sh.group_pow2)
    programs = min(nd, -(-cfg.programs // (sh.num_kv_heads * cfg.num_splits)))
    kernel = functools.partial(_decode_kernel, cfg=cfg, rows=rows, sh=sh, programs=programs, write=write)
    part = (nd, cfg.num_splits, sh.num_kv_heads, sh.group)
    out_shape = (
        jax.ShapeDtypeStruct(part, jnp.float32),
        jax.ShapeDtypeStruct(part, jnp.float32),
        jax.ShapeDtypeStruct((*part, sh.head_dim), jnp.float32),
    )
    args, aliases = (plan.counts, plan.decodes, page_table, q, kv_flat), {}
    if write is not None:
        if sh.num_tokens != 1:
            raise ValueError("the decode kernel writes the cache only in a 1-token bucket")
        out_shape += (jax.ShapeDtypeStruct(kv_flat.shape, kv_flat.dtype),)
        args, aliases = args + (slot_mapping,), {4: 3}
    return pl.pallas_call(
        kernel,
        grid=(sh.num_kv_heads, cfg.num_splits, programs),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="rpa_gpu_decode",
    )(*args)


def _merge_kernel(counts_ref, m_ref, l_ref, acc_ref, o_ref, *, splits, rows, cols, sh):
    d, kh, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r = jnp.arange(rows, dtype=jnp.int32)
    valid = r < sh.group
    g = jnp.where(valid, r, sh.group)  # [M]: rows past G point past the end (masked / dropped)
    g_ld = jnp.minimum(r, sh.group - 1)
    col = c * cols + jnp.arange(cols, dtype=jnp.int32)[None, :]  # [1, C]: this program's columns
    valid_2d = jnp.broadcast_to(valid[:, None], (rows, cols))
    # Two passes over the splits (a static loop): the top max, then the weighted sums.
    ms = [m_ref[d, s, kh, g_ld] for s in range(splits)]  # splits x [M]
    top = functools.reduce(jnp.maximum, ms)
    top = jnp.where(top == -jnp.inf, 0.0, top)  # every split empty: all weights 0
    denom = jnp.zeros((rows,), jnp.float32)
    num = jnp.zeros((rows, cols), jnp.float32)
    for s in range(splits):
        w = jnp.exp2(ms[s] - top)  # [M]
        denom += w * l_ref[d, s, kh, g_ld]
        acc = acc_ref[d, s, kh, g_ld[:, None], col]  # [M, C]
        num += jnp.where(w[:, None] > 0, w[:, None] * acc, 0.0)  # an empty split's acc may be unset
    live = (d < counts_ref[1]) & (denom > 0)  # [M]: unused items and keyless rows come out 0
    out = jnp.where(live[:, None], num / jnp.where(live, denom, 1.0)[:, None], 0.0)
    plgpu.store(o_ref.at[d, kh, g[:, None], col], out.astype(o_ref.dtype), mask=valid_2d)


def merge_splits(counts, m, l, acc, *, dtype, sh: Shapes, interpret: bool):
    """One launch for what `combine` does: m, l [ND, NS, K, G], acc [.., H] -> [ND, K, G, H] in
    `dtype`, 0 for unused items. At one stream the three fusions XLA makes of `combine` cost more
    than the attention kernel (bench/RESULTS.md, 2026-11-23)."""
    nd, splits = m.shape[:2]
    rows = max(16, sh.group_pow2)
    # Column stripes of 32: a lone decode's 8 kv heads alone are 8 programs, each loading all its
    # splits' partials one after another; 4 stripes spread those loads over 4x the SMs.
    cols = min(32, sh.head_dim)
    kernel = functools.partial(_merge_kernel, splits=splits, rows=rows, cols=cols, sh=sh)
    return pl.pallas_call(
        kernel,
        grid=(nd, sh.num_kv_heads, sh.head_dim // cols),
        out_shape=jax.ShapeDtypeStruct((nd, sh.num_kv_heads, sh.group, sh.head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rpa_gpu_merge",
    )(counts, m, l, acc)


def combine(m, l, acc):
    """Merges the splits of each decode item: m, l [ND, NS, K, G], acc [.., H] -> [ND, K, G, H] f32.

    Rows of unused items (never written) come out as garbage; the caller drops them.
    """
    top = jnp.max(m, axis=1, keepdims=True)  # [ND, 1, K, G]
    w = jnp.exp2(m - jnp.where(top == -jnp.inf, 0.0, top))  # empty splits: m = -inf, weight 0
    denom = jnp.sum(w * l, axis=1)  # [ND, K, G]
    num = jnp.sum(jnp.where(w[..., None] > 0, w[..., None] * acc, 0.0), axis=1)  # [ND, K, G, H]
    return jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None], 0.0)
