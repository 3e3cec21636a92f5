"""Schemathesis against the app's own OpenAPI schema: no generated input may produce a 5xx.

The schema needs the session tokenizer fixture, and schemathesis' pytest fixture loader does not
work with this pytest, so each operation's hypothesis strategy is driven by hand.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from router.app import create_app
from router.settings import RouterSettings
from tests.router.fake_engine import FakeEngine, make_info

MAX_EXAMPLES = 12  # per operation; keeps the whole test well under a minute on 2 cores


@pytest.fixture(scope="module")
def schema(hf_tokenizer, tokenizer_dir):
    engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir))
    app = create_app(RouterSettings(), engine, hf_tokenizer)
    return schemathesis.openapi.from_asgi("/api-doc/openapi.json", app)


def test_no_server_errors(schema):
    operations = [r.ok() for r in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/tokenize"} <= paths
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def run(case):
            case.call_and_validate(checks=[not_a_server_error])

        run()
