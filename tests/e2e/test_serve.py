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
