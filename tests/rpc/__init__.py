"""Helpers shared by the RPC and launcher tests: a tiny random Llama with SmolLM2's tokenizer, and
the engine server started as a real subprocess with test-sized limits.

Owns: building the tiny checkpoint and the server command line. Must not: import jax (the tests
that compare with an in-process LLMEngine import it themselves).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

from tests.support import JAX_CACHE, REPO, build_tiny_llama, smollm2_tokenizer_dir  # noqa: F401 (re-exported)
from tests.support import TINY_ENGINE_FLAGS as SERVER_FLAGS  # batch 16, 256 tokens, prefill 128, top-n 3


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = str(REPO)
    return env


def server_command(model_dir: pathlib.Path, socket_path: str) -> list[str]:
    return [
        sys.executable, "-m", "engine.rpc.server", "--socket", socket_path, "--model-id", str(model_dir),
        *SERVER_FLAGS, "--compilation-cache-dir", str(JAX_CACHE),
    ]  # fmt: skip


def start_server(model_dir: pathlib.Path, socket_path: str, log_path: pathlib.Path) -> subprocess.Popen:
    JAX_CACHE.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    return subprocess.Popen(
        server_command(model_dir, socket_path),
        cwd=REPO,
        env=server_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for_socket(
    proc: subprocess.Popen, socket_path: str, log_path: pathlib.Path, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise AssertionError(
                f"engine server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"engine server not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if `proc` is still running after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class FakeEngine:
    """Just enough of LLMEngine for the engine server: admission, abort and stats over `running`
    ({request id: a counter the subclass's step() uses}). Subclasses write add_request and step."""

    def __init__(self) -> None:
        from engine.api import EngineInfo

        self.info = EngineInfo("fake", "float32", 8, 100, 128, 64, 1024, 16, 0, 10, (0,), "")
        self.running: dict[str, int] = {}

    def validate(self, prompt, params):
        return [1, 2]

    def abort(self, request_id):
        self.running.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.running)

    def stats(self):
        import types

        return types.SimpleNamespace(
            num_running=len(self.running), num_waiting=0, kv_cache_usage=0.0, num_compiled_programs=0
        )
