"""Tests of the GPU ragged paged attention kernels against the pure-JAX reference, and of dispatch.

Owns: random ragged steps (decodes with long contexts, prefill chunks at nonzero starts, fresh
prefills, padding tokens and rows, tokens that see nothing) run through the kernels in Pallas' CPU
interpreter, the same at realistic shapes compiled on a GPU (`gpu` mark), and the backend choice.
Must not: test the reference itself (test_reference_attention.py does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.pallas_kernels import dispatch
from engine.pallas_kernels.ragged_paged_attention import (
    AttentionMetadata,
    kv_cache_shape,
    naive_ragged_paged_attention,
    ragged_paged_attention,
)
from engine.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from engine.pallas_kernels.ragged_paged_attention_gpu.plan import build_plan
from engine.pallas_kernels.ragged_paged_attention_gpu.tuned_block_sizes import INTERPRET, DecodeBlocks
from tests.engine.models.paged import Step, TinyPagedEngine

NUM_PAGES = 200
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


@functools.cache
def _jitted(fn, sm_scale, window, cap, **kw):
    return jax.jit(functools.partial(fn, sm_scale=sm_scale, sliding_window=window, soft_cap=cap, **kw))


def _step(rng, engine, requests, *, num_tokens, num_rows, max_pages) -> Step:
    """requests: (context already cached, new tokens) each, in a random order."""
    order = rng.permutation(len(requests))
    for i in order:
        engine.advance(int(i), requests[i][0])
    return engine.step([(int(i), [0] * requests[i][1]) for i in order],
                       num_tokens=num_tokens, num_rows=num_rows, max_pages=max_pages)


def _padding_to_empty_row(step: Step) -> Step:
    """The second half of the padding goes to an empty row: it must see no key and give 0. The first
    half keeps row 0 at position 0 (the runner's layout when every row is taken). Padding stays one
    contiguous tail, as the plan's capacities assume."""
    seq_lens = np.asarray(step.md.seq_lens)
    real = np.concatenate(step.token_index)
    pad = np.setdiff1d(np.arange(step.md.positions.shape[0]), real)
    token_seq = np.asarray(step.md.token_seq).copy()
    token_seq[pad[len(pad) // 2:]] = np.flatnonzero(seq_lens == 0)[0]
    md = AttentionMetadata(step.md.positions, step.md.slot_mapping, jnp.asarray(token_seq),
                           step.md.page_table, step.md.seq_lens)
    return Step(step.input_ids, md, step.token_index, step.row)


def _inputs(rng, num_tokens, n_heads, k_heads, head_dim, page_size, dtype, num_pages=NUM_PAGES):
    shape = kv_cache_shape(num_pages, page_size, k_heads, head_dim)
    cache = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((num_tokens, n_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((num_tokens, k_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((num_tokens, k_heads, head_dim)), dtype)
    return q, k, v, cache


NO_PREFETCH = dataclasses.replace(
    INTERPRET,
    prefill=dataclasses.replace(INTERPRET.prefill, prefetch_pages=False),
    decode=dataclasses.replace(INTERPRET.decode, prefetch_pages=False),
)
CASES = [
    # dtype, page_size, kv heads, q heads per kv head, sliding_window, soft_cap, block sizes
    (jnp.float32, 4, 2, 2, None, None, INTERPRET),
    (jnp.float32, 16, 1, 4, 7, 20.0, INTERPRET),
    (jnp.bfloat16, 16, 2, 2, 150, None, INTERPRET),
    (jnp.bfloat16, 4, 1, 3, None, 5.0, INTERPRET),  # a group that is not a power of two
    (jnp.float32, 8, 1, 2, None, None, NO_PREFETCH),
]


@pytest.mark.parametrize("dtype,page_size,k_heads,group,window,cap,sizes", CASES)
def test_interpreted_kernel_matches_oracle(dtype, page_size, k_heads, group, window, cap, sizes):
    rng = np.random.default_rng()
    h = 16
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=page_size, seed=int(rng.integers(1 << 31)))
    requests = [
        (int(rng.integers(130, 300)), 1),  # decodes split over several programs
        (int(rng.integers(1, 20)), 1),
        (int(rng.integers(60, 150)), int(rng.integers(20, 30))),  # chunk at a nonzero start
        (0, int(rng.integers(10, 25))),  # fresh prefill
        (int(rng.integers(5, 40)), 2),
    ]
    step = _padding_to_empty_row(_step(rng, engine, requests, num_tokens=80, num_rows=8,
                                       max_pages=-(-320 // page_size)))
    q, k, v, cache = _inputs(rng, 80, k_heads * group, k_heads, h, page_size, dtype)
    out, new_cache = _jitted(ragged_paged_attention_gpu, h**-0.5, window, cap, interpret=True,
                             block_sizes=sizes)(q, k, v, cache, step.md)
    want, want_cache = _jitted(naive_ragged_paged_attention, h**-0.5, window, cap)(q, k, v, cache, step.md)
    assert out.dtype == dtype and out.shape == q.shape
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(out).all()
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)
    no_keys = np.asarray(step.md.seq_lens)[np.asarray(step.md.token_seq)] == 0
    assert no_keys.any() and (out[no_keys] == 0).all()
    np.testing.assert_array_equal(np.asarray(new_cache, np.float32), np.asarray(want_cache, np.float32))


def test_fused_qkv_gives_the_same_output():
    """q passed as the fused projection [T, N + 2K, H] (num_q_heads=N, as the fused model does): the
    kernels read its first N heads in place, in a mixed step and in a 1-token bucket."""
    rng = np.random.default_rng()
    page_size, h, k_heads, group = 4, 16, 2, 3
    for num_tokens, requests in ((24, [(int(rng.integers(30, 90)), 1), (5, 9), (0, 6)]),
                                 (1, [(int(rng.integers(1, 90)), 1)])):
        engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=page_size, seed=int(rng.integers(1 << 31)))
        step = _step(rng, engine, requests, num_tokens=num_tokens, num_rows=4, max_pages=32)
        q, k, v, cache = _inputs(rng, num_tokens, k_heads * group, k_heads, h, page_size, jnp.float32)
        fn = _jitted(ragged_paged_attention_gpu, h**-0.5, None, None, interpret=True, block_sizes=INTERPRET)
        want, want_cache = fn(q, k, v, cache, step.md)
        fused_fn = _jitted(ragged_paged_attention_gpu, h**-0.5, None, None, interpret=True, block_sizes=INTERPRET,
                           num_q_heads=k_heads * group)
        got, got_cache = fused_fn(jnp.concatenate([q, k, v], axis=1), k, v, cache, step.md)
        assert got.shape == q.shape
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        np.testing.assert_array_equal(np.asarray(got_cache), np.asarray(want_cache))
        ref = _jitted(ragged_paged_attention, h**-0.5, None, None, num_q_heads=k_heads * group)
        np.testing.assert_allclose(np.asarray(ref(jnp.concatenate([q, k, v], axis=1), k, v, cache, step.md)[0]),
                                   np.asarray(want), atol=2e-5, rtol=2e-5)


def test_plan_keeps_padding_out_of_a_lone_decode():
    """One decode then padding sent to an empty row (the runner's layout of a single stream in a
    16-token bucket): one decode item over the whole context and no prefill block."""
    rng = np.random.default_rng()
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=16, seed=int(rng.integers(1 << 31)))
    context = int(rng.integers(20, 300))
    step = _step(rng, engine, [(context, 1)], num_tokens=16, num_rows=4, max_pages=32)
    token_seq = np.asarray(step.md.token_seq).copy()
    (decode,) = step.token_index[0]
    empty = np.flatnonzero(np.asarray(step.md.seq_lens) == 0)[0]  # rows are placed at random
    token_seq[np.setdiff1d(np.arange(16), [decode])] = empty
    md = AttentionMetadata(step.md.positions, step.md.slot_mapping, jnp.asarray(token_seq),
                           step.md.page_table, step.md.seq_lens)
    plan = build_plan(md, block_tokens=4, sliding_window=None)
    assert tuple(np.asarray(plan.counts)) == (0, 1)
    assert np.asarray(plan.decodes)[1, 0] == decode
    assert np.asarray(plan.decodes)[3, 0] == context + 1  # it sees its whole context and itself


# The interpreter's sizes with the occupancy rule on: a bucket of a few decode items splits wider.
FILL = dataclasses.replace(INTERPRET, decode=dataclasses.replace(INTERPRET.decode, fill=64, max_splits=16))


@pytest.mark.parametrize("window,cap", [(None, None), (40, 10.0)])
def test_lone_decode_bucket_matches_oracle(window, cap):
    """A 1-token bucket (one request decoding alone): no prefill block, so no prefill kernel, and a
    decode split wider than the tuned splits, down to one KV block per split."""
    rng = np.random.default_rng()
    page_size, h, k_heads, group = 4, 16, 2, 2
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=page_size, seed=int(rng.integers(1 << 31)))
    step = _step(rng, engine, [(int(rng.integers(20, 300)), 1)], num_tokens=1, num_rows=4,
                 max_pages=-(-320 // page_size))
    plan = build_plan(step.md, block_tokens=4, sliding_window=window)
    assert plan.blocks.shape[1] == 0 and tuple(np.asarray(plan.counts)) == (0, 1)
    q, k, v, cache = _inputs(rng, 1, k_heads * group, k_heads, h, page_size, jnp.float32)
    out, new_cache = _jitted(ragged_paged_attention_gpu, h**-0.5, window, cap, interpret=True,
                             block_sizes=FILL)(q, k, v, cache, step.md)
    want, want_cache = _jitted(naive_ragged_paged_attention, h**-0.5, window, cap)(q, k, v, cache, step.md)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(new_cache), np.asarray(want_cache))


def test_decode_splits_follow_occupancy():
    tuned = DecodeBlocks(block_kv=64, num_splits=4, min_split_blocks=8, num_warps=4, num_stages=3)
    assert tuned.for_items(64, 8) == tuned  # B=64 x 8 kv heads fill the device: tuned sizes
    lone = tuned.for_items(1, 8)  # one decode: split 16 ways, a block each at least
    assert (lone.num_splits, lone.min_split_blocks) == (16, 1)
    assert (tuned.for_items(16, 8).num_splits, tuned.for_items(4, 8).num_splits) == (4, 8)
    off = dataclasses.replace(tuned, fill=0)
    assert off.for_items(1, 1) == off


@pytest.mark.parametrize("group", [1, 4, 6])
def test_merge_kernel_matches_combine(group):
    """The one-launch split merge against `combine` on fresh partials: empty splits (m = -inf, l = 0,
    acc never written: NaN here), rows no split saw, and unused items past the count (0)."""
    from engine.pallas_kernels.ragged_paged_attention_gpu import kernel

    rng = np.random.default_rng()
    nd, splits, kh, h = 5, 4, 2, 32
    m = rng.normal(size=(nd, splits, kh, group)).astype(np.float32) * 4
    l = rng.uniform(0.5, 3.0, size=m.shape).astype(np.float32)
    acc = rng.normal(size=(*m.shape, h)).astype(np.float32)
    empty = rng.random(m.shape) < 0.3
    empty[1, :, 0, 0] = True  # a row that saw no key at all
    m[empty], l[empty], acc[empty] = -np.inf, 0.0, np.nan
    used = 3
    sh = kernel.Shapes(num_tokens=nd, num_kv_heads=kh, group=group, head_dim=h, page_size=16, max_pages=4,
                       sm_scale=1.0, soft_cap=None, dot_precision=jax.lax.Precision.HIGHEST)
    got = kernel.merge_splits(jnp.array([0, used], jnp.int32), jnp.asarray(m), jnp.asarray(l), jnp.asarray(acc),
                              dtype=jnp.float32, sh=sh, interpret=True)
    want = np.asarray(kernel.combine(jnp.asarray(m), jnp.asarray(l), jnp.asarray(acc)))
    np.testing.assert_allclose(np.asarray(got)[:used], want[:used], rtol=1e-5, atol=1e-6)
    assert not np.asarray(got)[1, 0, 0].any()
    assert not np.asarray(got)[used:].any()


def test_unsupported_head_dim_falls_back_to_reference():
    rng = np.random.default_rng()
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=4, seed=int(rng.integers(1 << 31)))
    step = _step(rng, engine, [(9, 1), (0, 5)], num_tokens=8, num_rows=4, max_pages=8)
    q, k, v, cache = _inputs(rng, 8, 4, 2, 24, 4, jnp.float32)
    got = _jitted(ragged_paged_attention_gpu, 0.2, None, None)(q, k, v, cache, step.md)
    want = _jitted(ragged_paged_attention, 0.2, None, None)(q, k, v, cache, step.md)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatch_picks_kernel_on_gpu_only(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.attention_fn_for("gpu").__wrapped__ is ragged_paged_attention_gpu
    assert dispatch.attention_fn_for("cpu").__wrapped__ is ragged_paged_attention
    assert dispatch.attention_fn_for("tpu").__wrapped__ is ragged_paged_attention
    assert dispatch.attention_fn_for("gpu", backend="reference").__wrapped__ is ragged_paged_attention
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.attention_fn_for("gpu").__wrapped__ is ragged_paged_attention
    with pytest.raises(ValueError, match="attention backend 'flash'.*auto, reference, pallas"):
        dispatch.attention_fn_for("gpu", backend="flash")
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        dispatch.attention_fn_for("cpu", backend="pallas")


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype,window,cap", [(jnp.bfloat16, None, None), (jnp.float32, None, None),
                                              (jnp.bfloat16, 700, 30.0)])
def test_compiled_kernel_matches_reference_on_gpu(dtype, window, cap):
    """Llama-8B attention shapes (32 q / 8 kv heads, head dim 128, pages of 16), mixed step."""
    rng = np.random.default_rng()
    page_size, h = 16, 128
    num_pages = 6000
    engine = TinyPagedEngine(num_pages=num_pages, page_size=page_size, seed=int(rng.integers(1 << 31)))
    requests = [(int(rng.integers(1, 3000)), 1) for _ in range(24)]  # decodes
    requests += [(int(rng.integers(200, 900)), 150), (0, 300), (37, 17)]  # prefill chunks
    step = _padding_to_empty_row(_step(rng, engine, requests, num_tokens=512, num_rows=32, max_pages=256))
    q, k, v, cache = _inputs(rng, 512, 32, 8, h, page_size, dtype, num_pages)
    scale = h**-0.5
    out, new_cache = _jitted(ragged_paged_attention_gpu, scale, window, cap)(q, k, v, cache, step.md)
    want, want_cache = _jitted(ragged_paged_attention, scale, window, cap)(q, k, v, cache, step.md)
    real = np.concatenate(step.token_index)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    err = _rel_err(np.asarray(out, np.float32)[real], np.asarray(want, np.float32)[real])
    assert err < (1e-4 if dtype == jnp.float32 else 1e-2), err
    # Page 0 is excluded: padding tokens race for its slots (duplicate scatter indices on a GPU).
    np.testing.assert_array_equal(np.asarray(new_cache[:, 1:], np.float32), np.asarray(want_cache[:, 1:], np.float32))


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("window,fused", [(None, False), (700, False), (None, True)])
def test_compiled_lone_decode_matches_reference_on_gpu(window, fused):
    """The 1-token bucket at Llama-8B attention shapes: the tuned sizes widen to 16 splits. Fused:
    q/k/v as one array, so the decode kernel writes the cache itself."""
    rng = np.random.default_rng()
    page_size, h, num_pages = 16, 128, 400
    engine = TinyPagedEngine(num_pages=num_pages, page_size=page_size, seed=int(rng.integers(1 << 31)))
    step = _step(rng, engine, [(int(rng.integers(1, 3000)), 1)], num_tokens=1, num_rows=8, max_pages=256)
    q, k, v, cache = _inputs(rng, 1, 32, 8, h, page_size, jnp.bfloat16, num_pages)
    if fused:
        qkv = jnp.concatenate([q, k, v], axis=1)
        fn = _jitted(ragged_paged_attention_gpu, h**-0.5, window, None, num_q_heads=32)
        out, new_cache = fn(qkv, k, v, cache, step.md)
    else:
        out, new_cache = _jitted(ragged_paged_attention_gpu, h**-0.5, window, None)(q, k, v, cache, step.md)
    want, want_cache = _jitted(ragged_paged_attention, h**-0.5, window, None)(q, k, v, cache, step.md)
    assert _rel_err(np.asarray(out, np.float32), np.asarray(want, np.float32)) < 1e-2
    np.testing.assert_array_equal(np.asarray(new_cache, np.float32), np.asarray(want_cache, np.float32))
