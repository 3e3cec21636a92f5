"""Tests for engine/sampling.py against transformers' torch logits processors and numpy.

Owns: correctness of penalties, filters, greedy rows, seeded draws, logprobs and padding rows.
Must not: depend on a fixed random draw (logits are fresh each run; the seed is printed for
replay) or grow slow: vocabularies are small and every shape compiles once.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.sampling import (
    SamplingRow,
    apply_penalties,
    build_sampling_metadata,
    sample,
    warp_logits,
)
from engine.sampling_params import SamplingParams

_sample = jax.jit(sample, static_argnames=("all_greedy", "use_penalties", "num_top_logprobs"))
_warp = jax.jit(warp_logits)
_penalize = jax.jit(apply_penalties)


def _draw(logits: np.ndarray, md):
    return _sample(logits, md, all_greedy=False, use_penalties=False, num_top_logprobs=0)


@pytest.fixture
def rng() -> np.random.Generator:
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"rng seed {seed}")  # shown by pytest on failure, to replay a run
    return np.random.default_rng(seed)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hf_warp(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """transformers' warpers in HF/TGI order on one row of logits [V]."""
    scores = torch.from_numpy(logits[None].astype(np.float32))
    warpers = [TemperatureLogitsWarper(float(p.temperature))]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    for w in warpers:
        scores = w(None, scores)
    return scores[0].numpy()


def _mass_with_margin(probs: np.ndarray, rng: np.random.Generator) -> float:
    """A cumulative-mass cut halfway between two prefix sums of `probs` (in the filter's order).

    Cutting at a random value could land within f32 rounding of a prefix sum, where torch and XLA
    may legitimately disagree; halfway between gives a margin of half a token's probability.
    """
    cum = np.cumsum(probs)
    choices = [j for j in range(1, len(probs)) if probs[j] > 1e-2 and cum[j] < 1 - 1e-3]
    if not choices:
        return 1.0  # nothing to cut: filter off
    j = rng.choice(choices)
    return float((cum[j - 1] + cum[j]) / 2)


def _params_with_margins(
    logits: np.ndarray, temperature: float, top_k: int, use_p: bool, use_typ: bool, rng: np.random.Generator
) -> SamplingParams:
    """Pick top_p / typical_p for one row so that the kept set has a safe margin (float64 math)."""
    x = logits.astype(np.float64) / temperature
    if top_k > 0:
        x = np.where(x >= np.sort(x)[::-1][min(top_k, x.size) - 1], x, -np.inf)
    top_p = 1.0
    if use_p:
        probs = _softmax(x)
        top_p = _mass_with_margin(np.sort(probs)[::-1], rng)
        order = np.argsort(-probs)
        kept = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        x = np.where(np.isin(np.arange(x.size), kept), x, -np.inf)
    typical_p = 1.0
    if use_typ:
        probs = _softmax(x)
        with np.errstate(divide="ignore"):
            surprisal = -np.log(probs)  # inf where filtered, so those sort last
        ent = np.sum(probs * -np.log(np.where(probs > 0, probs, 1.0)))
        typical_p = _mass_with_margin(probs[np.argsort(np.abs(surprisal - ent))], rng)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p)


def _rows(params: list[SamplingParams], rng: np.random.Generator, steps=None) -> list[SamplingRow]:
    steps = range(len(params)) if steps is None else steps
    return [SamplingRow(p, int(rng.integers(0, 2**63)), int(s)) for p, s in zip(params, steps)]


def test_penalties_match_reference(rng):
    r, v, hist_len = 6, 64, 24
    logits = (rng.normal(size=(r + 2, v)) * 3).astype(np.float32)
    rows, refs = [], []
    for i in range(r):
        n_prompt, n_out = int(rng.integers(1, 10)), int(rng.integers(0, 12))
        ids = rng.integers(0, 32, size=n_prompt + n_out)  # ids < 32 so prompt and output overlap
        if i == 0:
            p = SamplingParams()  # neutral row with a history: must come out unchanged
        else:
            p = SamplingParams(
                repetition_penalty=float(rng.uniform(0.5, 2.0)),
                frequency_penalty=float(rng.uniform(-2, 2)),
                presence_penalty=float(rng.uniform(-2, 2)),
            )
        rows.append(SamplingRow(p, 0, n_out, ids.tolist(), n_prompt))
        ref = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            torch.from_numpy(ids)[None], torch.from_numpy(logits[i : i + 1].copy())
        )[0].numpy()
        count = np.bincount(ids[n_prompt:], minlength=v).astype(np.float32)
        refs.append(ref - p.frequency_penalty * count - p.presence_penalty * (count > 0))
    md = build_sampling_metadata(rows, r + 2, hist_len)
    got = np.asarray(_penalize(logits, md))
    np.testing.assert_allclose(got[:r], np.stack(refs), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[0], logits[0])
    np.testing.assert_array_equal(got[r:], logits[r:])  # padding rows are neutral


def test_penalties_count_output_only_for_frequency_presence():
    v = 10
    logits = np.full((1, v), 2.0, np.float32)
    logits[0, 7] = -1.0
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # prompt [3, 5], output [5, 7, 7]; history padded to 8 with -1, which must not hit token 9.
    md = build_sampling_metadata([SamplingRow(p, 0, 3, [3, 5, 5, 7, 7], num_prompt=2)], 1, 8)
    got = np.asarray(_penalize(logits, md))[0]
    want = np.full(v, 2.0, np.float32)
    want[3] = 1.0  # prompt only: repetition penalty, no frequency/presence
    want[5] = 1.0 - 0.5 - 0.25  # prompt and one output
    want[7] = -1.0 * 2.0 - 2 * 0.5 - 0.25  # negative logit multiplied; two outputs
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_filters_match_hf(rng):
    v = 100
    combos = [  # (top_k, top_p on, typical on)
        (0, False, False), (5, False, False), (1, False, False), (v + 10, False, False),
        (0, True, False), (0, False, True), (20, True, False), (20, False, True),
        (0, True, True), (30, True, True),
    ]  # fmt: skip
    logits = (rng.normal(size=(len(combos) + 2, v)) * 2).astype(np.float32)
    params = [
        _params_with_margins(logits[i], float(rng.choice([0.5, 0.75, 1.0, 1.5])), k, use_p, use_typ, rng)
        for i, (k, use_p, use_typ) in enumerate(combos)
    ]
    params.append(SamplingParams(temperature=0.0, top_k=3, top_p=0.5))  # greedy row with filters set
    md = build_sampling_metadata(_rows(params, rng), len(combos) + 2, None)
    got = np.asarray(_warp(logits, md))
    for i, p in enumerate(params[: len(combos)]):
        ref = _hf_warp(logits[i], p)
        kept = np.isfinite(got[i])
        np.testing.assert_array_equal(kept, np.isfinite(ref), err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(_softmax(got[i]), _softmax(ref), atol=1e-6, err_msg=f"row {i}: {p}")
    # A sanity check that the filters really cut something in this run.
    assert np.isfinite(got[1]).sum() == 5 and np.isfinite(got[2]).sum() == 1


def test_filters_edge_cases_match_hf(rng):
    v = 40
    logits = (rng.normal(size=(6, v)) * 2).astype(np.float32)
    logits[0, rng.choice(v, 10, replace=False)] = -np.inf  # e.g. vocab padding masked by the model
    logits[1, :3] = logits[1].max() + 1.0  # a three-way tie at the top: top_k=2 keeps all three
    logits[2, rng.choice(v, 10, replace=False)] = -np.inf
    logits[4] *= 1e4  # softmax is one-hot in f32
    logits[5, :] = -3.0
    params = [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_k=2),
        _params_with_margins(logits[2], 1.0, 0, True, True, rng),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1.0, top_p=0.9, typical_p=0.9),
        SamplingParams(temperature=1.0, top_k=5, typical_p=0.5),  # all tied: everything stays
    ]
    md = build_sampling_metadata(_rows(params, rng), 8, None)
    got = np.asarray(_warp(np.concatenate([logits, logits[:2]]), md))
    for i, p in enumerate(params):
        ref = _hf_warp(logits[i], p)
        np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(ref), err_msg=f"row {i}: {p}")
        np.testing.assert_allclose(_softmax(got[i]), _softmax(ref), atol=1e-6, err_msg=f"row {i}: {p}")
    assert np.isfinite(got[1]).sum() == 3 and np.isfinite(got[3]).sum() == 1


def test_greedy_rows_take_argmax_of_penalized_logits(rng):
    r, v = 8, 50
    logits = rng.normal(size=(r, v)).astype(np.float32)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=1.0, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.0, presence_penalty=2.0, typical_p=0.5),
        SamplingParams(temperature=0.7, repetition_penalty=1.3),
        SamplingParams(temperature=0.0),
    ]
    rows = [
        SamplingRow(p, int(rng.integers(0, 2**63)), 4, rng.integers(0, v, size=9).tolist(), 5)
        for p in params
    ]
    md = build_sampling_metadata(rows, r, 16)
    penalized = np.asarray(_penalize(logits, md))
    mixed = _sample(logits, md, all_greedy=False, use_penalties=True, num_top_logprobs=0)
    for i in (0, 2, 4, 5, 6, 7):  # greedy and padding rows
        assert int(mixed.tokens[i]) == int(np.argmax(penalized[i]))
    greedy_md = build_sampling_metadata([rows[i] for i in (0, 2, 4)], r, 16)
    fast = _sample(logits, greedy_md, all_greedy=True, use_penalties=True, num_top_logprobs=0)
    np.testing.assert_array_equal(fast.tokens, np.argmax(np.asarray(_penalize(logits, greedy_md)), -1))
    plain = _sample(logits, greedy_md, all_greedy=True, use_penalties=False, num_top_logprobs=0)
    np.testing.assert_array_equal(np.asarray(plain.tokens), np.argmax(logits, -1))


def test_seeded_draw_ignores_the_rest_of_the_batch(rng):
    v = 64
    row_logits = (rng.normal(size=v) * 0.5).astype(np.float32)  # flat-ish: draws vary a lot
    seed = int(rng.integers(2**32, 2**63))
    target = SamplingRow(SamplingParams(temperature=1.0), seed, 3, [1, 2, 3], 1)

    alone = build_sampling_metadata([target], 4, None)
    tok_a = int(_draw(np.tile(row_logits, (4, 1)), alone).tokens[0])

    # Other rows exercise every path (penalties, top-k/top-p, typical, greedy); the target sits at row 5.
    others = [
        SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.2),
        SamplingParams(temperature=1.2, top_k=10, typical_p=0.7),
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=1.0, top_k=3),
    ]
    rows = [SamplingRow(p, int(rng.integers(0, 2**63)), 7, [4, 5, 6], 2) for p in others]
    rows.append(target)
    mixed = build_sampling_metadata(rows, 8, 4)
    logits_b = rng.normal(size=(8, v)).astype(np.float32)
    logits_b[5] = row_logits
    tok_b = int(_sample(logits_b, mixed, all_greedy=False, use_penalties=True, num_top_logprobs=2).tokens[5])
    assert tok_a == tok_b

    # Different steps (and seeds differing only in the high word) give different streams.
    def stream(s: int) -> np.ndarray:
        rows = [SamplingRow(SamplingParams(temperature=1.0), s, step) for step in range(16)]
        md = build_sampling_metadata(rows, 16, None)
        return np.asarray(_draw(np.tile(row_logits, (16, 1)), md).tokens)

    toks = stream(seed)
    assert toks[3] == tok_a
    assert len(set(toks.tolist())) > 1
    np.testing.assert_array_equal(stream(seed), toks)
    assert not np.array_equal(stream(seed ^ (1 << 40)), toks)


def test_draw_frequencies_match_filtered_distribution(rng):
    v, n = 12, 2000
    logits = rng.normal(size=v).astype(np.float32)
    configs = [
        SamplingParams(temperature=0.8, top_k=6),
        _params_with_margins(logits, 1.5, 0, True, False, rng),
        _params_with_margins(logits, 1.0, 8, False, True, rng),
        SamplingParams(temperature=1.0),
    ]
    params = [p for p in configs for _ in range(n)]
    md = build_sampling_metadata(_rows(params, rng), len(params), None)
    tokens = np.asarray(_draw(np.tile(logits, (len(params), 1)), md).tokens).reshape(len(configs), n)
    for p, toks in zip(configs, tokens):
        want = _softmax(_hf_warp(logits, p).astype(np.float64))
        counts = np.bincount(toks, minlength=v)
        assert np.all(counts[want == 0] == 0), p
        # 5 sigma per token: a false alarm is ~1e-5 per run, while a wrong filter or temperature
        # moves some count by far more.
        sigma = np.sqrt(n * want * (1 - want))
        assert np.all(np.abs(counts - n * want) <= 5 * sigma + 1), (p, counts, n * want)


def test_logprobs_and_top_n_are_raw_log_softmax(rng):
    r, v, n_top = 6, 40, 5
    logits = (rng.normal(size=(r, v)) * 2).astype(np.float32)
    params = [SamplingParams(temperature=t, repetition_penalty=3.0) for t in (0.0, 1.0, 0.0, 1.3)]
    rows = [SamplingRow(p, int(rng.integers(0, 2**63)), 0, rng.integers(0, v, 6).tolist(), 6) for p in params]
    md = build_sampling_metadata(rows, r, 8)
    out = _sample(logits, md, all_greedy=False, use_penalties=True, num_top_logprobs=n_top)
    ref = torch.log_softmax(torch.from_numpy(logits), -1)
    tokens = torch.tensor(np.asarray(out.tokens)).long()
    np.testing.assert_allclose(out.logprobs, ref.gather(1, tokens[:, None])[:, 0].numpy(), atol=1e-5)
    top = torch.topk(ref, n_top)
    np.testing.assert_array_equal(out.top_ids, top.indices.numpy())
    np.testing.assert_allclose(out.top_logprobs, top.values.numpy(), atol=1e-5)
    assert out.top_ids.dtype == np.int32 and out.tokens.dtype == np.int32

    none = _sample(logits, md, all_greedy=False, use_penalties=True, num_top_logprobs=0)
    assert none.top_ids.shape == (r, 0) and none.top_logprobs.shape == (r, 0)
    np.testing.assert_array_equal(none.tokens, out.tokens)


def test_builder_pads_with_greedy_neutral_rows(rng):
    seed = (0x12345678 << 32) | 0x9ABCDEF0
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, typical_p=0.8)
    md = build_sampling_metadata([SamplingRow(p, seed, 11, num_prompt=4)], 4, None)
    assert md.history.shape == (4, 1) and np.all(md.history == -1)
    np.testing.assert_array_equal(md.seed[0], np.array([0x12345678, 0x9ABCDEF0], np.uint32))
    assert md.seed.dtype == np.uint32 and md.step.dtype == np.int32 and md.temperature.dtype == np.float32
    assert md.step[0] == 11 and md.top_k[0] == 5 and md.num_prompt[0] == 4
    np.testing.assert_array_equal(md.temperature[1:], 0.0)
    np.testing.assert_array_equal(md.top_k[1:], 0)
    for name in ("top_p", "typical_p", "repetition_penalty"):
        np.testing.assert_array_equal(getattr(md, name)[1:], 1.0)
    for name in ("frequency_penalty", "presence_penalty"):
        np.testing.assert_array_equal(getattr(md, name)[1:], 0.0)

    logits = rng.normal(size=(4, 30)).astype(np.float32)
    out = _sample(logits, md, all_greedy=False, use_penalties=False, num_top_logprobs=0)
    np.testing.assert_array_equal(np.asarray(out.tokens)[1:], np.argmax(logits[1:], -1))

    penalized = SamplingParams(temperature=0.7, presence_penalty=1.0)
    with pytest.raises(ValueError, match="penalties"):
        build_sampling_metadata([SamplingRow(penalized, 0, 0, [1, 2], 1)], 2, None)
    with pytest.raises(ValueError, match="penalties"):
        build_sampling_metadata([SamplingRow(penalized, 0, 0)], 2, 4)
    with pytest.raises(ValueError, match="exceed"):
        build_sampling_metadata([SamplingRow(penalized, 0, 0, [1, 2, 3], 1)], 2, 2)
    with pytest.raises(ValueError, match="bucket"):
        build_sampling_metadata([SamplingRow(p, 0, 0)] * 3, 2, None)


def test_logit_bias_rides_on_the_penalty_path():
    import jax.numpy as jnp
    import numpy as np

    from engine.sampling import SamplingRow, build_sampling_metadata, sample
    from engine.sampling_params import SamplingParams

    rng = np.random.default_rng()
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    natural = logits.argmax(-1)
    rows = [
        SamplingRow(SamplingParams(logit_bias=((7, 100.0),)), 0, 0, [1, 2], 2),
        SamplingRow(SamplingParams(logit_bias=((int(natural[1]), -100.0),)), 0, 0, [1, 2], 2),
        SamplingRow(SamplingParams(), 0, 0, [1, 2], 2),
    ]
    md = build_sampling_metadata(rows, 4, history_len=8)
    padded = jnp.asarray(np.concatenate([logits, np.zeros((1, 50), np.float32)]))
    out = sample(padded, md, all_greedy=True, use_penalties=True, num_top_logprobs=0)
    tokens = np.asarray(out.tokens)
    assert tokens[0] == 7
    assert tokens[1] != natural[1]
    assert tokens[2] == natural[2]


def test_sampler_row_buckets_are_coarse_on_accelerators_only():
    from engine.step_programs import sample_buckets

    every = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert sample_buckets(every, "gpu") == (16, 64, 256)
    assert sample_buckets(every[:-1], "tpu") == (16, 64, 128)
    assert sample_buckets((1, 2, 4, 8), "gpu") == (8,)
    assert sample_buckets(every, "cpu") == every
