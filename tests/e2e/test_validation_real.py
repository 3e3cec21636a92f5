"""The router's validation, malformed-input and fuzzing tests, run again against a real `tgx serve`.

Limits-dependent messages are checked against this server's own limits (max_total_tokens 256,
--max-top-n-tokens 3), the rest with the router suite's table.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.router.test_tgi import RULES

LIMIT_DEPENDENT = ("truncate", "top_n_tokens")
REAL_RULES = [
    (params, message) for params, message in RULES
    if not any(k in params for k in LIMIT_DEPENDENT) and "`inputs` tokens" not in message
] + [
    ({"top_n_tokens": 4}, "`top_n_tokens` must be >= 0 and <= 3. Given: 4"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 255. Given: 0"),
]  # fmt: skip
MALFORMED = [b"{not json", b'{"inputs": "\xff\xfe"}', b"", b"[]", b'{"inputs": "x", "parameters": {"top_k": "many"}}',
             b"\xff\xfe\xfd", b'{"inputs": "x", "parameters": 5}']  # fmt: skip
ROUTES = ["/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/"]


def test_every_validation_rule(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        for params, message in REAL_RULES:
            r = client.post("/generate", json={"inputs": "Hi there", "parameters": params})
            assert r.status_code == 422, (params, r.text)
            assert r.json() == {"error": f"Input validation error: {message}", "error_type": "validation"}
        r = client.post("/generate", json={"inputs": "Hi there", "parameters": {"max_new_tokens": 255}})
        assert r.status_code == 422 and "must be <= 256" in r.json()["error"]


def test_malformed_bodies_are_4xx(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        for path in ROUTES:
            for content in MALFORMED:
                r = client.post(path, content=content, headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (path, content, r.status_code, r.text)
                assert "error" in r.json()


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server}/api-doc/openapi.json")


def test_schemathesis_finds_no_5xx(schema, server):
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"} <= {op.path for op in operations}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=server, checks=[not_a_server_error], timeout=120)

        run()
