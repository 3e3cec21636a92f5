"""`tgx serve` end to end under load: 200 concurrent streams, disconnects, overload, prompt details."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from tests.e2e.conftest import metric


async def _stream_generate(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, dict | None]:
    tokens, last = 0, None
    async with client.stream("POST", f"{url}/generate_stream", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                tokens += 1
                last = event
    return tokens, last


def test_200_concurrent_streams_complete_with_correct_counts(server):
    rng = random.Random()

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            bodies = []
            for i in range(200):
                params = {"max_new_tokens": rng.randint(1, 16), "details": True}
                if i % 3 == 1:
                    params.update(do_sample=True, temperature=0.8, top_k=20, seed=i)
                if i % 5 == 2:
                    params.update(repetition_penalty=1.2, top_n_tokens=2)
                bodies.append({"inputs": "word " * rng.randint(1, 60), "parameters": params})
            results = await asyncio.gather(*(_stream_generate(client, server, b) for b in bodies))
            return bodies, results

    bodies, results = asyncio.run(main())
    for body, (n, last) in zip(bodies, results):
        details = last["details"]
        assert n == details["generated_tokens"]
        if details["finish_reason"] == "length":
            assert n == body["parameters"]["max_new_tokens"]
        else:
            assert n <= body["parameters"]["max_new_tokens"]


def test_disconnects_free_every_page(server):
    async def open_and_drop(client: httpx.AsyncClient) -> None:
        body = {"inputs": "tell me a long story", "parameters": {"max_new_tokens": 200}}
        async with client.stream("POST", f"{server}/generate_stream", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    return  # leaves the stream open mid-generation: the context manager disconnects

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            await asyncio.gather(*(open_and_drop(client) for _ in range(50)))

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(server, "tgx_kv_cache_usage") == 0 and metric(server, "tgi_batch_current_size") == 0:
            break
        time.sleep(0.2)
    assert metric(server, "tgx_kv_cache_usage") == 0
    assert metric(server, "tgi_batch_current_size") == 0


def test_overload_gives_429_not_timeouts(server):
    async def one(client: httpx.AsyncClient) -> int:
        body = {"inputs": "go", "parameters": {"max_new_tokens": 40}}
        resp = await client.post(f"{server}/generate", json=body)
        return resp.status_code

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=400)) as client:
            start = time.monotonic()
            codes = await asyncio.gather(*(one(client) for _ in range(320)))
            return codes, time.monotonic() - start

    codes, _ = asyncio.run(main())
    assert set(codes) <= {200, 429}
    assert codes.count(429) > 0 and codes.count(200) > 0


def test_details_with_prefill_logprobs(server):
    body = {"inputs": "The capital of France", "parameters": {"max_new_tokens": 3, "details": True, "decoder_input_details": True, "top_n_tokens": 2}}
    resp = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    details = resp.json()["details"]
    assert details["prefill"][0]["logprob"] is None and all(p["logprob"] <= 0 for p in details["prefill"][1:])
    assert len(details["tokens"]) == details["generated_tokens"] and len(details["top_tokens"][0]) == 2


def test_bench_serve_reports_vllm_fields(server, tmp_path):
    import subprocess
    import sys

    from tests.support import REPO

    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve.py"), "--base-url", server, "--num-prompts", "6",
           "--concurrency", "3", "--input-len", "12", "--output-len", "5", "--json-out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["total_output_tokens"] == 30 and result["total_input_tokens"] == 72
    for key in ("ttft", "tpot", "itl", "e2el"):
        assert result[f"p99_{key}_ms"] >= result[f"median_{key}_ms"] > 0
    assert "Output token throughput (tok/s)" in proc.stdout


def test_request_trace_reaches_otlp_under_client_traceparent(server, otlp_collector):
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    body = {"inputs": "trace me", "parameters": {"max_new_tokens": 4}}
    assert httpx.post(f"{server}/generate", json=body, headers=headers, timeout=60).status_code == 200
    deadline = time.monotonic() + 30  # the batch span processor flushes every few seconds
    while time.monotonic() < deadline:
        mine = [s for s in otlp_collector.spans if s.trace_id.hex() == trace_id]
        if {"validation", "queue", "prefill", "decode"} <= {s.name for s in mine}:
            break
        time.sleep(0.5)
    names = {s.name for s in mine}
    assert {"validation", "queue", "prefill", "decode"} <= names, names
    roots = [s for s in mine if s.parent_span_id.hex() == parent_id]
    assert roots, "the request's root span must be a child of the client's span"
