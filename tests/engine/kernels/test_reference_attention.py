"""Tests of the blocked ragged paged attention reference against the dense oracle.

Owns: random ragged steps (prefill chunks at nonzero starts, fresh prefills, decodes, padding
tokens and rows, shuffled pages) checked for outputs, written cache, zero rows and batch invariance.
Must not: test models (tests/engine/models does) or depend on any accelerator.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.pallas_kernels.ragged_paged_attention import (
    AttentionMetadata,
    kv_cache_shape,
    naive_ragged_paged_attention,
    ragged_paged_attention,
)
from tests.engine.models.paged import Step, TinyPagedEngine

H = 16
NUM_PAGES = 160


@functools.cache
def _jitted(fn, sm_scale, sliding_window, soft_cap):
    return jax.jit(functools.partial(fn, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap))


def _random_step(rng, engine, k_heads, requests, *, num_tokens, num_rows, max_pages, dtype):
    """requests: (context already cached, new tokens) each. Returns the step and q [T, N, H], k, v."""
    for i, (ctx, _) in enumerate(requests):
        engine.advance(i, ctx)
    step = engine.step(
        [(i, [0] * new) for i, (_, new) in enumerate(requests)],
        num_tokens=num_tokens, num_rows=num_rows, max_pages=max_pages,
    )
    q = jnp.asarray(rng.standard_normal((num_tokens, 2 * k_heads, H)), dtype)  # G = 2
    k = jnp.asarray(rng.standard_normal((num_tokens, k_heads, H)), dtype)
    v = jnp.asarray(rng.standard_normal((num_tokens, k_heads, H)), dtype)
    return step, q, k, v


def _point_padding_at_empty_row(step: Step) -> Step:
    """Sends half the padding tokens to an empty row, where they must see no key and give 0."""
    seq_lens = np.asarray(step.md.seq_lens)
    empty = np.flatnonzero(seq_lens == 0)
    real = np.concatenate(step.token_index)
    pad = np.setdiff1d(np.arange(step.md.positions.shape[0]), real)
    token_seq = np.asarray(step.md.token_seq).copy()
    token_seq[pad[::2]] = empty[0]
    md = AttentionMetadata(step.md.positions, step.md.slot_mapping, jnp.asarray(token_seq),
                           step.md.page_table, step.md.seq_lens)
    return Step(step.input_ids, md, step.token_index, step.row)


CASES = [
    # dtype, page_size, kv heads, sliding_window, soft_cap
    (jnp.float32, 8, 2, None, None),
    (jnp.float32, 16, 1, 7, None),
    (jnp.float32, 16, 2, 150, 20.0),
    (jnp.bfloat16, 16, 2, None, 5.0),
    (jnp.bfloat16, 8, 1, 40, None),
]


@pytest.mark.parametrize("dtype,page_size,k_heads,window,cap", CASES)
def test_blocked_matches_naive(dtype, page_size, k_heads, window, cap):
    rng = np.random.default_rng()
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=page_size, seed=int(rng.integers(1 << 31)))
    cache = jnp.asarray(rng.standard_normal(kv_cache_shape(NUM_PAGES, page_size, k_heads, H)), dtype)
    # Contexts span several 128-token blocks; T = 96 makes two query tiles, the second padded.
    requests = [
        (int(rng.integers(130, 300)), 1),  # decodes
        (int(rng.integers(1, 20)), 1),
        (int(rng.integers(100, 200)), 30),  # prefill chunk at a nonzero start, across a block edge
        (0, int(rng.integers(10, 25))),  # fresh prefill
        (int(rng.integers(5, 40)), int(rng.integers(5, 20))),
    ]
    step, q, k, v = _random_step(rng, engine, k_heads, requests, num_tokens=96, num_rows=8,
                                 max_pages=40, dtype=dtype)
    step = _point_padding_at_empty_row(step)
    scale = H**-0.5
    out, new_cache = _jitted(ragged_paged_attention, scale, window, cap)(q, k, v, cache, step.md)
    want, want_cache = _jitted(naive_ragged_paged_attention, scale, window, cap)(q, k, v, cache, step.md)
    assert out.dtype == dtype and out.shape == q.shape

    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(out).all()
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out, want, atol=tol, rtol=tol)

    md = step.md
    no_keys = np.asarray(md.seq_lens)[np.asarray(md.token_seq)] == 0
    assert no_keys.any() and (out[no_keys] == 0).all()

    # The cache holds every real token's K/V at its slot, and nothing else changed outside page 0.
    np.testing.assert_array_equal(np.asarray(new_cache, np.float32), np.asarray(want_cache, np.float32))
    got = np.asarray(new_cache, np.float32).reshape(2, -1, k_heads, H)
    old = np.asarray(cache, np.float32).reshape(2, -1, k_heads, H)
    real = np.concatenate(step.token_index)
    slots = np.asarray(md.slot_mapping)[real]
    np.testing.assert_array_equal(got[0, slots], np.asarray(k, np.float32)[real])
    np.testing.assert_array_equal(got[1, slots], np.asarray(v, np.float32)[real])
    untouched = np.setdiff1d(np.arange(page_size, got.shape[1]), slots)
    np.testing.assert_array_equal(got[:, untouched], old[:, untouched])


def _run_request_in(rng_seed, ctx_vals, q, k, v, others, *, num_tokens, num_rows, max_pages, page_size):
    """Runs request 'x' (cached context ctx_vals [2, c, K, H] + new q/k/v) among `others`."""
    rng = np.random.default_rng(rng_seed)
    k_heads = ctx_vals.shape[2]
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=page_size, seed=rng_seed)
    cache = rng.standard_normal(kv_cache_shape(NUM_PAGES, page_size, k_heads, H)).astype(np.float32)
    chunks = []
    for i, (ctx, new) in enumerate(others):
        engine.advance(i, ctx)
        chunks.append((i, [0] * new))
    engine.advance("x", ctx_vals.shape[1])
    flat = cache.reshape(2, -1, k_heads, H)
    flat[:, engine.slots("x")] = ctx_vals
    at = int(rng.integers(len(chunks) + 1))
    chunks.insert(at, ("x", [0] * q.shape[0]))
    step = engine.step(chunks, num_tokens=num_tokens, num_rows=num_rows, max_pages=max_pages)
    shape = lambda a: (num_tokens, *a.shape[1:])  # noqa: E731
    qs, ks, vs = (rng.standard_normal(shape(a)).astype(np.float32) for a in (q, k, v))
    idx = step.token_index[at]
    qs[idx], ks[idx], vs[idx] = q, k, v
    fn = _jitted(ragged_paged_attention, H**-0.5, None, None)
    out, _ = fn(jnp.asarray(qs), jnp.asarray(ks), jnp.asarray(vs), jnp.asarray(cache), step.md)
    return np.asarray(out)[idx]


@pytest.mark.parametrize("new_tokens", [1, 20])
def test_batch_invariance(new_tokens):
    """The same request gives the same bits alone and in a batch with a different page layout."""
    rng = np.random.default_rng()
    ctx_vals = rng.standard_normal((2, 200, 2, H)).astype(np.float32)
    q = rng.standard_normal((new_tokens, 4, H)).astype(np.float32)
    k, v = (rng.standard_normal((new_tokens, 2, H)).astype(np.float32) for _ in range(2))
    alone = _run_request_in(1, ctx_vals, q, k, v, [], num_tokens=32, num_rows=2, max_pages=16,
                            page_size=16)
    others = [(300, 1), (17, 5), (0, 6)]
    for seed, num_tokens in ((2, 40), (3, 48)):
        batched = _run_request_in(seed, ctx_vals, q, k, v, others, num_tokens=num_tokens, num_rows=8,
                                  max_pages=24, page_size=16)
        np.testing.assert_array_equal(batched, alone)
