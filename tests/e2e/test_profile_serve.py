"""`tgx serve --profile-dir`: the whole serving run is traced from ready to shutdown, a capture asked
for meanwhile through POST /admin/profile is a 409, and the trace is on disk once serve has exited.

Uses a tiny random-weight Llama (`--random-weights`), so start-up skips any checkpoint."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.rpc import JAX_CACHE, REPO, SERVER_FLAGS, server_env
from tests.tiny_config import write_tiny_config

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_profile_dir_traces_the_serving_run(tmp_path):
    model = write_tiny_config(tmp_path / "model")
    profiles = tmp_path / "profiles"  # created by serve
    port = _free_port()
    cmd = [
        sys.executable, "-m", "engine.cli", "serve", "--model-id", str(model), "--random-weights",
        *SERVER_FLAGS, "--hostname", "127.0.0.1", "--port", str(port),
        "--compilation-cache-dir", str(JAX_CACHE), "--profile-dir", str(profiles),
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        n = random.randint(4, 12)
        r = httpx.post(
            f"{url}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": n, "details": True}},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["details"]["generated_tokens"] <= n
        busy = httpx.post(f"{url}/admin/profile", params={"seconds": 1}, timeout=60)
        assert busy.status_code == 409 and busy.json()["error_type"] == "profiler_busy", busy.text
        assert str(profiles) in busy.json()["error"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, log_path.read_text()[-3000:]
    (run,) = profiles.glob("serve-*")
    (xplane,) = run.glob("plugins/profile/*/*.xplane.pb")
    (perfetto,) = run.glob("plugins/profile/*/perfetto_trace.json.gz")
    assert xplane.stat().st_size > 0
    with gzip.open(perfetto) as f:
        trace = json.load(f)
    names = {e.get("name") for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)}
    assert {"tgx.step", "tgx.schedule", "tgx.device_execute", "tgx.outputs"} <= names
    assert "profile of" in log_path.read_text()  # the engine said where it wrote the trace
