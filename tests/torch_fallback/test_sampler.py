"""The torch sampler against the Flax path's rules (engine/sampling.py) and against its own promises."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from engine import sampling as flax_sampling
from engine.sampling_params import SamplingParams
from torch_fallback.sampler import SampleRow, penalize, sample, warp

V = 64


def _rows_and_history(rng, params_list):
    rows = []
    for p in params_list:
        num_prompt = int(rng.integers(1, 12))
        ids = rng.integers(0, V, size=num_prompt + int(rng.integers(0, 12))).tolist()
        rows.append(SampleRow(p, int(rng.integers(0, 2**63)), ids, num_prompt))
    return rows


def _flax_metadata(rows):
    return flax_sampling.build_sampling_metadata(
        [flax_sampling.SamplingRow(r.params, r.seed, r.step, r.token_ids, r.num_prompt) for r in rows],
        len(rows),
        history_len=max(len(r.token_ids) for r in rows),
    )


def test_penalties_and_warpers_match_the_flax_sampler():
    rng = np.random.default_rng()
    params = [
        SamplingParams(temperature=0.7, top_k=9),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, typical_p=0.6),
        SamplingParams(temperature=1.1, top_k=20, top_p=0.9, typical_p=0.95),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.4),
        SamplingParams(temperature=0.5, logit_bias=((3, 5.0), (7, -2.5), (V + 4, 1.0)), top_p=0.5),
    ]
    rows = _rows_and_history(rng, params)
    logits = rng.normal(0, 3, size=(len(rows), V)).astype(np.float32)  # [R, V]
    md = _flax_metadata(rows)
    want = np.asarray(flax_sampling.warp_logits(flax_sampling.apply_penalties(jnp.asarray(logits), md), md))
    for i, row in enumerate(rows):
        got = warp(penalize(torch.from_numpy(logits[i]), row), row.params).numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want[i]), err_msg=f"row {i}: kept set")
        kept = np.isfinite(want[i])
        np.testing.assert_allclose(got[kept], want[i][kept], rtol=1e-5, atol=1e-5)


def test_greedy_rows_take_the_penalized_argmax_and_report_raw_logprobs():
    rng = np.random.default_rng()
    rows = _rows_and_history(rng, [SamplingParams(top_n_tokens=3), SamplingParams(repetition_penalty=2.0)])
    logits = torch.from_numpy(rng.normal(0, 3, size=(2, V)).astype(np.float32))
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert out[0].token_id == int(torch.argmax(logits[0]))
    assert out[1].token_id == int(torch.argmax(penalize(logits[1], rows[1])))
    for o, lp in zip(out, raw):
        assert o.logprob == pytest.approx(float(lp[o.token_id]), abs=1e-6)
    top = torch.topk(raw[0], 3)
    assert [t for t, _ in out[0].top] == top.indices.tolist() and out[1].top == ()


def test_draws_follow_the_warped_distribution_and_replay_per_seed_whatever_the_batch():
    rng = np.random.default_rng()
    logits = torch.from_numpy(rng.normal(0, 1, size=(V,)).astype(np.float32))
    params = SamplingParams(temperature=0.8, top_k=6)
    n = 3000
    base = int(rng.integers(0, 2**62))
    rows = [SampleRow(params, base + i, [1, 2], 2) for i in range(n)]
    draws = [s.token_id for s in sample(logits.expand(n, V), rows)]
    want = torch.softmax(warp(logits, params), -1).numpy()
    got = np.bincount(draws, minlength=V) / n
    assert set(np.flatnonzero(got)) <= set(np.flatnonzero(want))  # never a filtered token
    np.testing.assert_allclose(got, want, atol=0.04)
    # The same (seed, step) draws the same token alone or among other rows; another step differs.
    alone = [sample(logits[None], [rows[i]])[0].token_id for i in range(20)]
    assert alone == draws[:20]
    later = [sample(logits[None], [SampleRow(params, base + i, [1, 2, 3], 2)])[0].token_id for i in range(50)]
    assert later != draws[:50]
