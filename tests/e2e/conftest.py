"""A real `tgx serve` (engine process + router process) on localhost, for end-to-end tests.

It serves a tiny random Llama with SmolLM2's tokenizer and chat template, so start-up is quick; the
real-model numerics are covered by tests/engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import JAX_CACHE, REPO as ROOT, build_tiny_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory):
    """Yields the base URL of a running `tgx serve`; stops it afterwards."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable, "-m", "engine.cli", "serve",
        "--model-id", str(tiny_model_dir),
        "--dtype", "float32",
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--max-batch-size", "16",
        "--max-total-tokens", "256",
        "--max-batch-prefill-tokens", "128",
        "--max-top-n-tokens", "3",
        "--max-concurrent-requests", "256",
        "--compilation-cache-dir", str(JAX_CACHE),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tgx serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tgx serve did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def metric(url: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample from /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
