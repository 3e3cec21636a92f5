"""Fixtures for the torch fallback: tiny random models of unported architectures, and `tgx serve` over them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _free_port
from tests.support import REPO
from tests.torch_fallback.models import build_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """architecture -> directory, built on first use."""
    built: dict = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch))
        return built[arch]

    return get


def serve_command(model_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "engine.cli", "serve",
        "--model-id", str(model_dir), "--dtype", "float32",
        "--hostname", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_serves(models: dict[str, Path], logs: Path, *extra: str):
    """{name: base URL} of healthy `tgx serve --model-id` processes, one per model, started together
    (their start-ups overlap) and stopped on exit."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs: dict[str, tuple[subprocess.Popen, str, Path]] = {}
    try:
        for name, model_dir in models.items():
            port, log = _free_port(), logs / f"{name}.log"
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    serve_command(model_dir, port, *extra),
                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True,
                )  # fmt: skip
            procs[name] = (proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 300
        for proc, url, log in procs.values():
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
                time.sleep(0.3)
        yield {name: url for name, (_, url, _) in procs.items()}
    finally:
        for proc, _, _ in procs.values():
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
