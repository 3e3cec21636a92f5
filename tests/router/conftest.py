"""Router test fixtures: the SmolLM2 tokenizer, a FakeEngine app, and a real uvicorn server on a
free 127.0.0.1 port for SDK tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import uvicorn
from litestar.testing import TestClient

from router.app import create_app
from router.settings import RouterSettings
from tests.router.fake_engine import FakeEngine, make_info
from tests.support import smollm2_tokenizer_dir


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return str(smollm2_tokenizer_dir())


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def make_client(hf_tokenizer, tokenizer_dir):
    """make_client(settings=None, token_delay=0, span_exporter=None, **info) -> (TestClient, FakeEngine)."""
    clients = []

    def make(settings: RouterSettings | None = None, token_delay: float = 0.0, span_exporter=None, **info):
        engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir, **info), token_delay=token_delay)
        app = create_app(settings or RouterSettings(), engine, hf_tokenizer, span_exporter=span_exporter)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client, engine

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """Runs `app` under a real uvicorn on a free 127.0.0.1 port (in a thread); yields the base URL."""
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(hf_tokenizer, tokenizer_dir):
    """A real uvicorn server serving create_app(FakeEngine); yields (base_url, engine)."""
    engine = FakeEngine(hf_tokenizer, make_info(tokenizer_dir), token_delay=0.002)
    with serve(create_app(RouterSettings(), engine, hf_tokenizer)) as base:
        yield base, engine
