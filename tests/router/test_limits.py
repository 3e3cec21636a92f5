"""Backpressure and protection: 429, 413, 401, CORS, malformed bodies, client disconnect."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.router.conftest import serve
from tests.router.fake_engine import FakeEngine, make_info


def test_overload_429_at_once(hf_tokenizer, tokenizer_dir):
    engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir), token_delay=0.02)
    app = create_app(RouterSettings(max_concurrent_requests=1), engine, hf_tokenizer)
    with serve(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        slow = threading.Thread(
            target=client.post,
            args=("/generate",),
            kwargs={"json": {"inputs": "x", "parameters": {"max_new_tokens": 10}}},
        )
        slow.start()
        while engine.running == 0:
            time.sleep(0.005)
        t0 = time.perf_counter()
        # TGI takes the permit before validation: even an invalid request is 429 now.
        r = client.post("/generate", json={"inputs": "x", "parameters": {"top_k": -1}})
        assert r.status_code == 429 and time.perf_counter() - t0 < 0.15
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        slow.join()
        r = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}})
        assert r.status_code == 200  # the permit came back
        assert 'tgi_request_failure{err="overloaded"} 2.0' in client.get("/metrics").text


def test_payload_limit_413(make_client):
    client, _ = make_client(RouterSettings(payload_limit=200))
    r = client.post("/generate", json={"inputs": "x" * 500})
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"


def test_api_key_401(make_client):
    client, _ = make_client(RouterSettings(api_key="s3cret"))
    body = {"inputs": "x", "parameters": {"max_new_tokens": 1}}
    r = client.post("/generate", json=body)
    assert r.status_code == 401 and r.content == b""
    assert client.post("/generate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/generate", json=body, headers={"Authorization": "bearer S3CRET"}).status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401
    for path in ("/health", "/info", "/metrics", "/v1/models"):
        assert client.get(path).status_code == 200, path
    assert (
        client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "x"}]}).status_code
        == 200
    )


def test_cors(make_client):
    client, _ = make_client(RouterSettings(cors_allow_origin=("https://ok.example",)))
    pre = {
        "Origin": "https://ok.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    r = client.options("/generate", headers=pre)
    assert r.status_code in (200, 204) and r.headers["access-control-allow-origin"] == "https://ok.example"
    r = client.options("/generate", headers={**pre, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    open_client, _ = make_client()
    r = open_client.get("/info", headers={"Origin": "https://any.example"})
    assert r.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"inputs": "\xff\xfe"}',
        b"",
        b"[]",
        b'{"inputs": "x", "parameters": {"top_k": "many"}}',
        b'{"inputs": "x", "parameters": {"max_new_tokens": 1e400}}',
        b"\xff\xfe\xfd",
        b'{"inputs": "x", "parameters": 5}',
    ],
)
@pytest.mark.parametrize(
    "path", ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/"]
)
def test_malformed_bodies_are_4xx(client, path, content):
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert "error" in body


def test_disconnect_cancels_engine_request(hf_tokenizer, tokenizer_dir):
    engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir), token_delay=0.02)
    app = create_app(RouterSettings(max_concurrent_requests=1), engine, hf_tokenizer)
    with serve(app) as base:
        for path, body in (
            ("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 200, "stop": ["never"]}}),
            (
                "/v1/chat/completions",
                {
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 200,
                    "stream": True,
                    "stop": ["never"],
                },
            ),
        ):
            n_cancelled = len(engine.cancelled)
            with httpx.Client(base_url=base, timeout=10) as c, c.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data:") and '"content":""' not in line:
                        break  # one real token seen; leave mid-stream
            deadline = time.time() + 5
            while (engine.running or len(engine.cancelled) == n_cancelled) and time.time() < deadline:
                time.sleep(0.02)
            assert engine.running == 0 and len(engine.cancelled) == n_cancelled + 1, path
            assert len(engine.started[-1:]) == 1 and engine.started[-1] not in engine.finished
            # the permit was returned: a new request gets in (max_concurrent_requests=1)
            r2 = httpx.post(
                f"{base}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}, timeout=10
            )
            assert r2.status_code == 200
        assert 'tgi_request_failure{err="dropped"} 2.0' in httpx.get(f"{base}/metrics").text
