"""POST /admin/profile against create_app(FakeEngine): `seconds` from the query or the body, the
1..120 range (422 otherwise), 409 while a capture runs, the API key, and the answer's paths."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from router.app import create_app
from router.settings import RouterSettings
from tests.router.conftest import serve
from tests.router.fake_engine import FakeEngine, make_info


def test_seconds_from_query_or_body_and_the_answer(make_client):
    client, engine = make_client()
    q = round(random.uniform(1, 120), 3)
    r = client.post(f"/admin/profile?seconds={q}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seconds"] == q and body["trace_dir"] == "/tmp/fake-profile/capture-1"
    assert body["xplane"].endswith(".xplane.pb") and body["perfetto_trace"].endswith("perfetto_trace.json.gz")
    assert (
        body["trace_dir"] in body["open_with"]["xprof"]
        and body["trace_dir"] in body["open_with"]["tensorboard"]
    )
    assert (
        body["perfetto_trace"] in body["open_with"]["perfetto"]
        and "ui.perfetto.dev" in body["open_with"]["perfetto"]
    )
    b = random.randint(1, 120)
    assert client.post("/admin/profile", json={"seconds": b}).status_code == 200
    assert client.post("/admin/profile").status_code == 200  # no seconds: the default
    assert engine.profiles == [q, float(b), 10.0]


@pytest.mark.parametrize(
    "query, body, needle",
    [
        ("seconds=0", None, "`seconds` must be >= 1 and <= 120. Given: 0"),
        ("seconds=120.5", None, "Given: 120.5"),
        ("seconds=nan", None, "Given: nan"),
        ("seconds=soon", None, "`seconds` must be a number"),
        ("", {"seconds": -3}, "Given: -3"),
        ("", {"seconds": True}, "`seconds` must be a number"),
        ("", {"seconds": "10"}, None),  # a numeric string is accepted, as in the query
        ("", [10], "JSON object"),
        ("", b"{not json", "must be JSON"),
    ],
)
def test_bad_seconds_are_422_and_start_nothing(make_client, query, body, needle):
    client, engine = make_client()
    url = "/admin/profile" + (f"?{query}" if query else "")
    if isinstance(body, bytes):
        r = client.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(url, json=body)
    if needle is None:
        assert r.status_code == 200 and engine.profiles == [10.0]
        return
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and needle in r.json()["error"]
    assert engine.profiles == []


def test_route_is_not_in_the_openapi_schema(client):
    # Fuzzers and generated clients read the schema; a capture slows the engine for up to 2 minutes.
    paths = client.get("/api-doc/openapi.json").json()["paths"]
    assert "/generate" in paths and not any(p.startswith("/admin") for p in paths)


def test_api_key_guards_the_route(make_client):
    client, engine = make_client(RouterSettings(api_key="s3cret"))
    assert client.post("/admin/profile?seconds=1").status_code == 401
    r = client.post("/admin/profile?seconds=1", headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 200 and engine.profiles == [1.0]


def test_engine_gone_is_503(make_client):
    from engine.rpc.client import EngineUnavailableError

    client, engine = make_client()

    async def gone(seconds):
        raise EngineUnavailableError("engine connection lost")

    engine.profile = gone
    r = client.post("/admin/profile?seconds=2")
    assert r.status_code == 503 and r.json()["error_type"] == "healthcheck"


def test_second_capture_while_one_runs_is_409(hf_tokenizer, tokenizer_dir):
    engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir))
    engine.profile_delay = 0.5

    async def both(base: str):
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            first = asyncio.create_task(c.post("/admin/profile", params={"seconds": 3}))
            while not engine.profiling:
                await asyncio.sleep(0.01)
            second = await c.post("/admin/profile", json={"seconds": 4})
            return await first, second

    with serve(create_app(RouterSettings(), engine, hf_tokenizer)) as base:
        first, second = asyncio.run(both(base))
        after = httpx.post(f"{base}/admin/profile", params={"seconds": 5}, timeout=10)
    assert first.status_code == 200 and first.json()["seconds"] == 3
    assert second.status_code == 409 and second.json()["error_type"] == "profiler_busy"
    assert "already being captured" in second.json()["error"]
    assert after.status_code == 200  # the busy flag does not outlive the capture
    assert engine.profiles == [3.0, 5.0]
