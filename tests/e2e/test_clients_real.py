"""The router's real-client tests (openai SDK sync/async/streaming, huggingface_hub InferenceClient),
collected again here against a real `tgx serve` instead of the fake engine."""

from __future__ import annotations

import pytest

from tests.router.test_clients import *  # noqa: F403
from tests.router.test_clients import _hub_online_for_localhost  # noqa: F401 (autouse; `*` skips it)


@pytest.fixture(scope="module")
def base_url(server):
    return server
