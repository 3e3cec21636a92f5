"""Serving benchmark client: streams /v1/completions at a fixed concurrency or request rate.

Owns: one whole HTTP measurement against a running `tgx serve` (or any OpenAI-compatible server
honouring `ignore_eos`): random token-id prompts of a fixed length, fixed output length, and the
figures `vllm bench serve` prints (request, output and total throughput; mean, median and p99 of
TTFT, TPOT, ITL and E2EL), printed as a table and written as JSON. Must not: import the engine.

    python bench/serve.py --base-url http://127.0.0.1:3000 --num-prompts 64 --concurrency 16 \\
        --input-len 128 --output-len 64 --json-out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    sent: float = 0.0  # since the run's start
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], output_len: int, t0: float) -> Result:
    body = {
        "model": "tgx",
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    res, start = Result(), time.perf_counter()
    res.sent = start - t0
    last = start
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                now = time.perf_counter()
                if chunk.get("choices"):
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
        res.e2el = time.perf_counter() - start
        res.ok = res.output_tokens > 0
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def _client(args: argparse.Namespace, prompts: list[list[int]], delays: list[float], concurrency: int,
                  t0: float, label: str) -> list[Result]:
    """One process's share: its prompts at its share of the concurrency, timed against t0 (monotonic)."""
    limit = asyncio.Semaphore(concurrency or len(prompts))
    done = 0

    async def task(client, prompt, delay):
        nonlocal done
        await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
        async with limit:
            res = await one_request(client, args.base_url, prompt, args.output_len, t0)
        done += 1
        if done % max(1, len(prompts) // 10) == 0 or done == len(prompts):
            print(f"[{done}/{len(prompts)}] requests done{label}", file=sys.stderr, flush=True)
        return res

    limits = httpx.Limits(max_connections=(concurrency or len(prompts)) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        return await asyncio.gather(*(task(client, p, d) for p, d in zip(prompts, delays)))


def _client_process(job: tuple) -> list[Result]:
    return asyncio.run(_client(*job))


def run(args: argparse.Namespace) -> tuple[list[Result], float]:
    rng = random.Random(args.seed)
    lo, hi = args.token_id_range
    prompts = [[rng.randrange(lo, hi) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    # Poisson arrivals at --request-rate; inf sends everything at once (concurrency still caps).
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if args.request_rate != float("inf"):
            t += rng.expovariate(args.request_rate)
    n = max(1, min(args.processes, args.concurrency or args.num_prompts, args.num_prompts))
    if n == 1:
        t0 = time.perf_counter()
        results = asyncio.run(_client(args, prompts, delays, args.concurrency, t0, ""))
        return results, time.perf_counter() - t0
    # Several client processes, so that parsing thousands of streamed events a second never makes
    # the client the bottleneck. Process i takes every n-th prompt and its share of the concurrency;
    # all start at one instant of the (system-wide) monotonic clock.
    share = [args.concurrency // n + (i < args.concurrency % n) for i in range(n)] if args.concurrency else [0] * n
    t0 = time.perf_counter() + 1.0
    jobs = [(args, prompts[i::n], delays[i::n], share[i], t0, f" (client process {i + 1}/{n})") for i in range(n)]
    with concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
        parts = list(pool.map(_client_process, jobs))
    results = [r for part in parts for r in part]
    return results, max(r.sent + r.e2el for r in results) if results else 0.0


def summarize(results: list[Result], duration: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731

    def stats(name: str, xs: list[float]) -> dict:
        xs = sorted(xs) or [0.0]
        p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
        return {f"mean_{name}_ms": statistics.fmean(xs), f"median_{name}_ms": statistics.median(xs), f"p99_{name}_ms": p99}

    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out = {
        "base_url": args.base_url,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    out |= stats("ttft", ms([r.ttft for r in ok]))
    out |= stats("tpot", ms(tpot))
    out |= stats("itl", ms([x for r in ok for x in r.itl]))
    out |= stats("e2el", ms([r.e2el for r in ok]))
    # Little's law over the run: how many requests were, on average, waiting for their first token
    # and how many were streaming. A server that keeps its batch full has few of the first.
    out["mean_awaiting_first_token"] = sum(r.ttft for r in ok) / duration
    out["mean_streaming"] = sum(r.e2el - r.ttft for r in ok) / duration
    # Each request's (sent, first token, done) in seconds since the start: shows waves of arrivals.
    out["timeline"] = [[round(r.sent, 4), round(r.sent + r.ttft, 4), round(r.sent + r.e2el, 4)] for r in ok]
    errors = sorted({r.error for r in results if r.error})
    if errors:
        out["errors"] = errors[:5]
    return out


def print_table(s: dict) -> None:
    rows = [
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", s["duration_s"]),
        ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Total Token throughput (tok/s)", s["total_token_throughput"]),
    ]
    print("{:=^52}".format(" Serving Benchmark Result "))
    for name, value in rows:
        print(f"{name:<40}{value:>12.2f}" if isinstance(value, float) else f"{name:<40}{value:>12}")
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):  # fmt: skip
        print("{:-^52}".format(title))
        for stat in ("mean", "median", "p99"):
            print(f"{stat.capitalize() + ' ' + key.upper() + ' (ms):':<40}{s[f'{stat}_{key}_ms']:>12.2f}")
    print("=" * 52)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:3000")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=0, help="most requests in flight (0: no cap)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=(1000, 9000))
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--processes", type=int, default=1,
                        help="client processes sharing the prompts and the concurrency (keeps a busy client "
                             "off the critical path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    results, duration = run(args)
    summary = summarize(results, duration, args)
    print_table(summary)
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2) + "\n")
    if summary["failed"]:
        sys.exit(f"{summary['failed']} requests failed: {summary.get('errors')}")


if __name__ == "__main__":
    main()
