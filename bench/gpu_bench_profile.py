"""The `profile` part of bench/gpu_bench.py: JAX profiler traces of the engine in three regimes,
each summarised on the spot (bench/trace_summary.py) so one device call answers "where did the time go".

Owns: driving an already-built engine into a steady state, tracing a fixed number of its steps
(single-stream decode, a 64-request decode batch, and the 1024-in / 128-out serving mix at the
engine's batch limit), and copying each trace's perfetto file to --trace-out. Must not: time the
engine for the record (the traced steps run slower than untraced ones) or leave requests behind.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import trace_summary
from gpu_bench_workers import prompts

from engine.profiling import Profiler
from engine.sampling_params import SamplingParams


def _trace(engine, label: str, steps: int, base: Path, trace_out: Path | None) -> dict:
    prof = Profiler(str(base))
    prof.start(label)
    for _ in range(steps):
        engine.step()
    result = prof.stop()
    copy_to = trace_out / f"{label}.perfetto_trace.json.gz" if trace_out is not None else None
    return trace_summary.report(result.perfetto_trace, label, copy_to)


def _settle(engine, steps: int) -> None:
    for _ in range(steps):
        engine.step()


def _clear(engine, ids: list[str]) -> None:
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():  # the launched step still lands
        engine.step()


def profile_worker_part(engine, args, vocab: int, special: set[int]) -> dict:
    base = Path(tempfile.mkdtemp(prefix="tgx-gpu-bench-traces-"))
    out = {}
    greedy = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)
    mbs, budget = engine.info.max_batch_size, engine.info.max_batch_prefill_tokens
    long_in = min(1024, engine.limits.max_total_tokens - 128)  # a CPU smoke run has a short context
    regimes = [
        # label, requests, input, output, steps before the trace, traced steps
        ("single_decode", 1, 128, 400, 16, 48),
        (f"decode_b{min(64, mbs)}", min(64, mbs), 128, 400, 12, 32),
        # Past the first finishes (~prompts/prefill-budget + 128 steps): prefill chunks and decodes mix.
        (
            f"mix_{long_in}x128_b{mbs}",
            3 * mbs,
            long_in,
            128,
            mbs * long_in // budget + 160,
            24,
        ),
    ]
    for label, n, inp, outp, settle, traced in regimes:
        print(f"[profile] {label}: {n} requests of {inp} in / {outp} out", file=sys.stderr, flush=True)
        outp = min(outp, engine.limits.max_total_tokens - inp)
        ids = []
        for k, p in enumerate(prompts(args.seed + 7, n, inp, vocab, special)):
            rid = f"{label}-{k}"
            engine.add_request(p, greedy(outp), request_id=rid)
            ids.append(rid)
        _settle(engine, settle)
        out[label] = _trace(engine, label, traced, base, args.trace_out)
        _clear(engine, ids)
    return out
