"""Asynchronous steps (step n+1 launched before step n's tokens reach the host) change nothing a
client can see, and really overlap.

Owns: on the real SmolLM2 (float32), the same engine run with async scheduling on and off gives
identical outputs (token ids, logprobs, text, finish reasons, counts) for a batch that mixes greedy
and seeded sampling, EOS, length limits, stop strings and stop token ids, with an abort mid-run,
leaving no pages behind; the launch order shows the overlap; and a request with penalties makes
steps run one at a time. Preemption under asynchronous steps is covered by test_real_model (its
engines run with the default, async on). Must not: time anything (behaviour only).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4,", "Hello! My name is",
           "Once upon a time", "def fibonacci(n):"]


def _params(seed: int) -> list[SamplingParams]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(len(PROMPTS)):
        kind = i % 4
        n = int(rng.integers(4, 40))
        if kind == 0:
            out.append(SamplingParams(max_new_tokens=n))  # greedy, may stop on EOS
        elif kind == 1:
            # Request 1 is the one aborted after 5 steps: it must still be running then in both modes.
            # One whose last step is in flight when the abort comes ends by length in async mode
            # (test_abort_while_the_last_step_is_in_flight_still_ends_the_request).
            out.append(SamplingParams(max_new_tokens=max(n, 12), ignore_eos=True, temperature=0.9, top_p=0.9,
                                      seed=int(rng.integers(1 << 30))))
        elif kind == 2:
            # "," is certain on the counting prompt, so the batch always mixes stop kinds.
            out.append(SamplingParams(max_new_tokens=40, stop=[" the", "\n", ","]))
        else:
            out.append(SamplingParams(max_new_tokens=n, temperature=0.7, seed=int(rng.integers(1 << 30)),
                                      stop_token_ids=[int(rng.integers(200, 2000))]))
    return out


def _run(engine, params, *, asynchronous: bool, abort_after: int | None = None):
    engine.cfg = dataclasses.replace(engine.cfg, async_scheduling=asynchronous)
    reqs = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    seen = {r.request_id: [] for r in reqs}
    finals = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append((tuple((t.token_id, round(t.logprob, 4)) for t in out.tokens), out.text))
            if out.finished:
                finals[out.request_id] = (out.finish_reason, out.num_generated_tokens, out.stop_sequence)
        steps += 1
        if abort_after is not None and steps == abort_after:
            out = engine.abort(reqs[1].request_id)
            if out is not None:
                finals[reqs[1].request_id] = (out.finish_reason, None, None)
    assert engine.stats().kv_cache_usage == 0 and engine.stats().num_running == 0
    preemptions = sum(r.num_preemptions for r in reqs)
    return [seen[r.request_id] for r in reqs], [finals.get(r.request_id) for r in reqs], preemptions


def test_async_equals_sync(engine):
    params = _params(seed=int(np.random.SeedSequence().entropy % 2**31))
    sync = _run(engine, params, asynchronous=False, abort_after=5)
    asy = _run(engine, params, asynchronous=True, abort_after=5)
    assert asy == sync
    reasons = {f[0] for f in sync[1] if f}
    assert "length" in reasons and len(reasons) > 1, reasons  # the batch really mixes stop kinds


def test_abort_while_the_last_step_is_in_flight_still_ends_the_request(engine):
    """Async steps retire a request that reaches its length when its last step launches; an abort
    arriving before that step's output is a no-op, and the step still reports the request's end."""
    engine.cfg = dataclasses.replace(engine.cfg, async_scheduling=True)
    req = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))
    finals, aborted_in_flight = [], False
    while engine.has_unfinished():
        outs = [o for o in engine.step() if o.request_id == req.request_id]
        finals += [o for o in outs if o.finished]
        known = any(req.request_id in s._requests for s in engine.schedulers)
        if not finals and not known:  # retired at launch, its output not out yet
            assert engine.abort(req.request_id) is None
            aborted_in_flight = True
    assert aborted_in_flight, "the last step was never seen in flight"
    assert [(o.finish_reason, o.num_generated_tokens) for o in finals] == [("length", 6)]
    assert engine.stats().kv_cache_usage == 0


def _launch_order(engine, params):
    events = []
    schedule, collect = engine.schedulers[0].schedule, engine.runner.collect
    engine.schedulers[0].schedule = lambda: (events.append("schedule"), schedule())[1]
    engine.runner.collect = lambda p: (events.append("collect"), collect(p))[1]
    try:
        for p, sp in zip(PROMPTS[:3], params):
            engine.add_request(p, sp)
        engine.run_until_done()
    finally:
        del engine.schedulers[0].schedule, engine.runner.collect
    return " ".join(events)


def test_steps_overlap_unless_a_request_needs_the_tokens(engine):
    engine.cfg = dataclasses.replace(engine.cfg, async_scheduling=True)
    plain = [SamplingParams(max_new_tokens=8, ignore_eos=True)] * 3
    # Step n+1 is scheduled before step n is collected.
    assert "schedule schedule collect" in _launch_order(engine, plain)
    # Penalties read the real history: one step at a time, while such a request runs.
    penalised = [*plain[:2], SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=1.3)]
    assert "schedule schedule collect" not in _launch_order(engine, penalised)
