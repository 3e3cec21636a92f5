"""The engine end to end on the real SmolLM2-135M-Instruct (GGUF Q4_1), float32, against transformers.

Covers: greedy continuations equal to transformers' generate, batch invariance, chunked prefill,
seeded sampling reproducibility, no recompilation after warmup, and no page leaks.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.engine.conftest import run_all

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:\n1.",
    "Translate to French: 'Good morning, how are you?'\n",
]
CHATS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name a fruit."}],
    [{"role": "user", "content": "Write a haiku about the ocean."}],
]


def _prompt_ids(tok) -> list[list[int]]:
    ids = [tok(p)["input_ids"] for p in RAW_PROMPTS]
    for chat in CHATS:
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    return [list(x) for x in ids]


def test_greedy_matches_transformers(engine, hf_smollm2):
    prompts = _prompt_ids(engine.tokenizer)
    assert len(prompts) >= 8
    ours = run_all(engine, prompts, SamplingParams(max_new_tokens=32))
    eos = list(engine.loaded.eos_token_ids)
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_smollm2.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
            )
        want = ref[0, len(ids) :].tolist()
        assert got == want, f"prompt {engine.tokenizer.decode(ids)!r}: {got} != {want}"


@pytest.fixture(scope="module")
def chunked_engine(make_engine):
    """Chunked prefill (32 tokens a step) with the 1-token bucket GPUs get; shared, since each engine
    compiles its own forward programs (its sampler programs are the main engine's, from the cache)."""
    return make_engine(max_batch_prefill_tokens=32, lone_decode_bucket=True)


def _random_workload(engine, n: int, seed: int):
    rng = random.Random(seed)
    vocab = engine.loaded.config.vocab_size
    special = set(engine.tokenizer.all_special_ids)
    prompts, params = [], []
    for _ in range(n):
        length = rng.randint(3, 180)
        prompts.append([t for t in (rng.randrange(vocab) for _ in range(length)) if t not in special] or [42])
        params.append(SamplingParams(max_new_tokens=rng.randint(1, 20), ignore_eos=rng.random() < 0.5))
    return prompts, params


def test_batch_invariance_and_chunked_prefill(engine, chunked_engine):
    seed = random.randrange(1 << 30)
    prompts, params = _random_workload(engine, 16, seed=seed)
    together = run_all(engine, prompts, params)
    # A random third of the batch, rerun one at a time: each must equal its batched self.
    for i in random.Random(seed).sample(range(len(prompts)), 6):
        assert run_all(engine, [prompts[i]], [params[i]])[0] == together[i], f"request {i} differs in a batch"
    assert [len(t) for t in together] == [
        len(t) if t and t[-1] in engine.loaded.eos_token_ids else sp.max_new_tokens
        for t, sp in zip(together, params)
    ]
    # Chunked, and with the 1-token bucket GPUs get: the tail of the run and a request run alone
    # decode one request at a time in it.
    assert chunked_engine.limits.token_buckets == (1, 16, 32, 64)
    chunked = run_all(chunked_engine, prompts, params)
    assert chunked == together
    longest = max(range(len(params)), key=lambda i: params[i].max_new_tokens)
    assert run_all(chunked_engine, [prompts[longest]], [params[longest]])[0] == together[longest]
    assert chunked_engine.kv_groups.is_full_free() and engine.kv_groups.is_full_free()


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    tok = engine.tokenizer
    prompt = tok("Write a short poem about autumn leaves.")["input_ids"]
    sp = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run_all(engine, [prompt], [sp])[0]
    others = [tok(t)["input_ids"] for t in ("Hello there", "The quick brown fox", "1, 2, 3,")]
    mixed = run_all(
        engine,
        [others[0], prompt, others[1], others[2]],
        [
            SamplingParams(max_new_tokens=10),
            sp,
            SamplingParams(max_new_tokens=30, temperature=1.2, seed=7),
            SamplingParams(max_new_tokens=5, repetition_penalty=1.3, frequency_penalty=0.5, top_n_tokens=3),
        ],
    )
    assert mixed[1] == alone
    other_seed = run_all(engine, [prompt], [dataclasses.replace(sp, seed=4321)])[0]
    assert other_seed != alone


def test_no_recompilation_after_warmup(engine):
    import jax
    import numpy as np
    from jax._src import monitoring

    compiles = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if "compile" in event:
            compiles.append(event)

    monitoring.register_event_duration_secs_listener(listener)
    jax.jit(lambda x: x * 3 + 1)(np.arange(5))  # control: the listener does see a compilation
    assert compiles, "the compilation listener saw nothing"
    compiles.clear()
    before = engine.runner.num_compiled_programs
    prompts, params = _random_workload(engine, 20, seed=3)
    variants = [
        SamplingParams(max_new_tokens=6, temperature=0.7, seed=1),
        SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.8, typical_p=0.9),
        SamplingParams(max_new_tokens=6, repetition_penalty=1.2, presence_penalty=0.4),
        SamplingParams(max_new_tokens=6, top_n_tokens=3),
        SamplingParams(max_new_tokens=6, temperature=0.5, frequency_penalty=1.0, top_n_tokens=2),
    ]
    run_all(engine, prompts + [prompts[0]] * len(variants), params + variants)
    for i in (1, 3, 6, 12):  # with the 25 above, single requests and odd batch sizes hit every request bucket
        run_all(engine, prompts[:i], variants[i % len(variants)])
    run_all(engine, [[7] * 250], SamplingParams(max_new_tokens=2))  # the largest prefill bucket
    try:
        assert compiles == [], f"{len(compiles)} compilations after warmup"
        assert engine.runner.num_compiled_programs == before
    finally:
        monitoring.unregister_event_duration_listener(listener)


def test_no_page_leaks_with_preemption_stops_and_cancels(make_engine, engine):
    # Only the KV pool is small. max_total_tokens stays the main engine's (no request here comes near
    # it) so that the sampler programs, which depend on it, load from the cache instead of compiling.
    small = make_engine(max_batch_total_tokens=640, max_batch_prefill_tokens=64)
    prompts, _ = _random_workload(small, 14, seed=11)
    prompts = [p[:64] for p in prompts]
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True) for _ in prompts]
    tok = small.tokenizer
    prompts[3] = tok("Once upon a time, there was")["input_ids"]
    params[3] = SamplingParams(max_new_tokens=40, stop=("e",))
    prompts[5] = tok("The capital of France is")["input_ids"]
    params[5] = SamplingParams(max_new_tokens=40, stop=("Paris", "London"))
    reqs = [small.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = {r.request_id: [] for r in reqs}
    reasons = {}
    steps = 0
    while small.has_unfinished():
        for out in small.step():
            tokens[out.request_id].extend(t.token_id for t in out.tokens)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        steps += 1
        if steps == 5:
            for r in (reqs[0], reqs[8]):
                out = small.abort(r.request_id)
                if out is not None:
                    reasons[r.request_id] = out.finish_reason
    assert small.kv_groups.is_full_free()
    assert set(reasons) == {r.request_id for r in reqs}
    assert reasons[reqs[0].request_id] == reasons[reqs[8].request_id] == "cancelled"
    assert sum(r.num_preemptions for r in reqs) > 0, "the workload was meant to force preemption"
    # A preempted request recomputes its KV and must continue exactly as it would have alone.
    preempted = [(r, sp) for r, sp in zip(reqs, params) if r.num_preemptions and reasons[r.request_id] == "length"]
    assert preempted
    for r, sp in preempted[:3]:
        assert tokens[r.request_id] == run_all(engine, [r.prompt_token_ids], [sp])[0]
    assert reasons[reqs[3].request_id] == reasons[reqs[5].request_id] == "stop_sequence"
    assert tok.decode(tokens[reqs[5].request_id]).endswith("Paris")


def test_prompt_logprobs_match_transformers_and_logit_bias(chunked_engine, engine, hf_smollm2):
    tok = engine.tokenizer
    text = ("The quick brown fox jumps over the lazy dog because it was tired of running, so it lay down "
            "in the warm grass by the old stone wall and watched the clouds drift across the sky")
    ids = tok(text)["input_ids"]
    assert 32 < len(ids) <= 64  # one chunk in the main engine, two in chunked_engine
    with torch.no_grad():
        logits = hf_smollm2(torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    for eng in (engine, chunked_engine):
        req = eng.add_request(ids, SamplingParams(max_new_tokens=2, prompt_logprobs=True))
        first = None
        while eng.has_unfinished():
            for out in eng.step():
                first = first or out
        assert first.request_id == req.request_id
        assert [t.token_id for t in first.prompt_tokens] == ids
        got = [t.logprob for t in first.prompt_tokens]
        assert got[0] != got[0]  # nan: nothing precedes the first token
        assert max(abs(a - b) for a, b in zip(got[1:], want)) < 1e-3
    # A +100 bias makes an unlikely token the greedy choice; -100 bans the natural one.
    natural = run_all(engine, [ids], SamplingParams(max_new_tokens=1))[0][0]
    target = tok(" zebra", add_special_tokens=False)["input_ids"][0]
    biased = run_all(
        engine, [ids, ids], [SamplingParams(max_new_tokens=1, logit_bias=((target, 100.0),)),
                             SamplingParams(max_new_tokens=1, logit_bias=((natural, -100.0),))]
    )
    assert biased[0] == [target]
    assert biased[1][0] != natural
