"""TorchEngine on tiny random models: transformers' greedy tokens, continuous batching, stops, aborts."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.config import EngineConfig
from engine.engine_factory import create_engine
from engine.sampling_params import SamplingParams
from torch_fallback.cb_backend import CBBackend
from torch_fallback.eager_backend import EagerBackend

# GPTNeoX runs on transformers' continuous batching; GPT-J lacks its attention interface (eager).
BACKENDS = {"GPTNeoXForCausalLM": CBBackend, "GPTJForCausalLM": EagerBackend}


@pytest.fixture(scope="module", params=list(BACKENDS))
def engine(request, tiny_dirs):
    cfg = EngineConfig(
        model_id=str(tiny_dirs(request.param)),
        dtype="float32",
        max_batch_size=4,
        max_total_tokens=128,
        max_batch_prefill_tokens=32,  # < the longest prompt below: CB chunks it
        max_batch_total_tokens=1024,
        max_top_n_tokens=3,
    )
    eng = create_engine(cfg)
    assert isinstance(eng.backend, BACKENDS[request.param])
    return eng


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 49000) for _ in range(n)]


def _reference(engine, ids: list[int], n: int, **kw) -> tuple[list[int], list[float]]:
    """transformers' greedy continuation of ids and the raw logprob of each token."""
    model = engine.loaded.model
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, **kw,
    )  # fmt: skip
    tokens = out.sequences[0, len(ids) :].tolist()
    lps = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)]
    return tokens, lps


def _drain(engine, outputs: dict) -> None:
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)


def test_greedy_tokens_equal_transformers_generate_under_continuous_batching(engine):
    rng = random.Random()
    prompts = [_prompt(rng, n) for n in (5, 40, 12, 3, 21, 9)]  # more than max_batch_size: some wait
    lengths = [rng.randint(4, 12) for _ in prompts]
    outputs: dict = {}
    for i, (ids, n) in enumerate(zip(prompts[:3], lengths)):
        engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True, top_n_tokens=2), f"a{i}")
    for _ in range(2):  # the rest arrive while the first ones decode
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    for i, (ids, n) in enumerate(zip(prompts[3:], lengths[3:]), start=3):
        engine.add_request(ids, SamplingParams(max_new_tokens=n, ignore_eos=True), f"a{i}")
    _drain(engine, outputs)
    for i, (ids, n) in enumerate(zip(prompts, lengths)):
        outs = outputs[f"a{i}"]
        tokens = [t for o in outs for t in o.tokens]
        want, lps = _reference(engine, ids, n)
        assert [t.token_id for t in tokens] == want, f"request {i}"
        assert [t.logprob for t in tokens] == pytest.approx(lps, abs=1e-4)
        assert all(len(o.tokens) == 1 for o in outs)  # streamed one token per output
        assert (
            outs[-1].finished
            and outs[-1].finish_reason == "length"
            and not any(o.finished for o in outs[:-1])
        )
        if i < 3:
            assert [t.token_id for t in tokens[0].top][:1] == want[:1] and len(tokens[0].top) == 2
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_a_prompt_longer_than_a_step_is_prefilled_in_chunks(engine):
    ids = _prompt(random.Random(), 100)  # 3 steps of at most 32 + 4 tokens before its first token
    outputs: dict = {}
    engine.add_request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True), "chunked")
    _drain(engine, outputs)
    assert [o.tokens[0].token_id for o in outputs["chunked"]] == _reference(engine, ids, 4)[0]


def test_abort_mid_generation_frees_the_cache(engine):
    rng = random.Random()
    engine.add_request(_prompt(rng, 30), SamplingParams(max_new_tokens=50, ignore_eos=True), "long")
    engine.add_request(_prompt(rng, 6), SamplingParams(max_new_tokens=5, ignore_eos=True), "short")
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 2 and engine.stats().kv_cache_usage > 0
    out = engine.abort("long")
    assert out.finished and out.finish_reason == "cancelled" and out.num_generated_tokens == 3
    assert engine.abort("long") is None
    assert engine.stats().num_running == 1
    outputs: dict = {}
    _drain(engine, outputs)
    assert "long" not in outputs and outputs["short"][-1].finish_reason == "length"
    stats = engine.stats()
    assert (stats.num_running, stats.kv_cache_usage) == (0, 0.0)


def test_stop_sequence_stop_token_and_eos_end_the_request(engine):
    rng = random.Random()
    ids = _prompt(rng, 8)
    want, _ = _reference(engine, ids, 10)
    text = engine.tokenizer.decode(want, skip_special_tokens=True)
    # Two characters the output reaches after its first 3 tokens and within 10.
    stop = text[len(engine.tokenizer.decode(want[:3], skip_special_tokens=True)) :].strip()[:2]
    assert len(stop) == 2, text
    outputs: dict = {}
    engine.add_request(ids, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)), "s")
    engine.add_request(ids, SamplingParams(max_new_tokens=10, stop_token_ids=(want[5],)), "t")
    _drain(engine, outputs)
    s = outputs["s"]
    assert s[-1].finish_reason == "stop_sequence" and s[-1].stop_sequence == stop
    assert "".join(o.text for o in s).endswith(stop) and len(s) <= 10
    t = outputs["t"]
    first = want.index(want[5])
    assert t[-1].finish_reason == "stop_sequence" and len(t) == first + 1
    eos = want[4]
    engine.loaded = dataclasses.replace(engine.loaded, eos_token_ids=(eos,))
    try:
        engine.add_request(ids, SamplingParams(max_new_tokens=10), "e")
        _drain(engine, outputs)
    finally:
        engine.loaded = dataclasses.replace(engine.loaded, eos_token_ids=())
    assert outputs["e"][-1].finish_reason == "eos_token" and len(outputs["e"]) == want.index(eos) + 1
    assert engine.stats().kv_cache_usage == 0.0


def test_seeded_sampling_replays_and_penalties_apply(engine):
    rng = random.Random()
    ids = _prompt(rng, 10)
    params = SamplingParams(
        max_new_tokens=8, ignore_eos=True, temperature=0.9, top_k=50, seed=rng.randrange(2**60)
    )

    def run(extra: int) -> list[int]:
        outputs: dict = {}
        engine.add_request(ids, params, "seeded")
        for j in range(extra):  # other requests in the batch must not move the draw
            engine.add_request(_prompt(rng, 7), dataclasses.replace(params, seed=None), f"other{j}")
        _drain(engine, outputs)
        assert all(o.seed == params.seed for o in outputs["seeded"])
        return [o.tokens[0].token_id for o in outputs["seeded"]]

    assert run(0) == run(3)
    outputs: dict = {}
    engine.add_request(ids, SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.8), "rep")
    _drain(engine, outputs)
    got = [o.tokens[0].token_id for o in outputs["rep"]]
    assert got == _reference(engine, ids, 8, repetition_penalty=1.8)[0]  # HF's CTRL-style penalty
    assert outputs["rep"][-1].seed is None


def test_validation_refuses_what_this_path_cannot_do(engine):
    with pytest.raises(
        ValueError, match=r"Input validation error: `decoder_input_details`.*torch fallback path"
    ):
        engine.validate("hello", SamplingParams(prompt_logprobs=True))
    with pytest.raises(ValueError, match="must be <= 127"):
        engine.validate(list(range(1, 129)), SamplingParams())
    with pytest.raises(ValueError, match=r"`top_n_tokens` must be >= 0 and <= 3"):
        engine.validate("hello", SamplingParams(top_n_tokens=4))
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.validate([engine.info.vocab_size], SamplingParams())
    assert engine.info.max_total_tokens == 128 and engine.info.max_batch_total_tokens == 1024
