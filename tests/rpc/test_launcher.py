"""`tgx serve`'s supervision: the engine child first, the router after it, both stopped together.

Owns: checks of the launcher's exit codes and child handling. The router child is a stand-in
module written to tmp_path (it records its argv and sleeps), so these tests do not depend on the
HTTP router. Must not: bind real ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.rpc import JAX_CACHE, REPO, SERVER_FLAGS, build_tiny_llama, server_env, stop

pytestmark = pytest.mark.timeout(600)

FAKE_ROUTER = """
import json, os, sys, time
with open(os.environ["FAKE_ROUTER_OUT"], "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "api_key": os.environ.get("API_KEY")}, f)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_engine_that_fails_to_load_stops_serve_with_its_message(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--model-id", str(missing), "--port", "0"],
        cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "tgx engine: error:" in result.stderr and str(missing) in result.stderr
    assert "engine process exited with code 2 before it was ready" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_engine_flag_fails_before_starting_anything():
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", "--page-size", "3"],
        cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--page-size must be a power of two" in result.stderr
    assert "engine process started" not in result.stderr


def _launch(model, tmp_path):
    """Starts `tgx serve` on `model` with the stand-in router; returns (launcher process, where the
    router records itself, launcher stderr path)."""
    (tmp_path / "fake_router.py").write_text(FAKE_ROUTER)
    out, err = tmp_path / "router.json", tmp_path / "launcher.err"
    env = {**server_env(), "FAKE_ROUTER_OUT": str(out)}
    env.pop("API_KEY", None)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{tmp_path}"
    code = "import sys; from engine.launcher import main; sys.exit(main(sys.argv[1:], 'fake_router'))"
    argv = [
        "--model-id", str(model), *SERVER_FLAGS, "--compilation-cache-dir", str(JAX_CACHE),
        "--port", "0", "--api-key", "secret", "--cors-allow-origin", "https://a.example",
    ]  # fmt: skip
    with open(err, "wb") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env, stderr=err_file)
    return proc, out, err


@pytest.fixture(scope="module")
def _launches(tmp_path_factory):
    """Launches for the tests below, each of which ends the one it gets. Two start together: their
    start-ups (imports, loading, compiling) overlap, which on 2 cores costs about as much as one."""
    model = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")
    started = []

    def start():
        started.append(_launch(model, tmp_path_factory.mktemp("launch")))
        return started[-1]

    pool = [start(), start()]
    try:
        yield lambda: pool.pop(0) if pool else start()
    finally:
        for proc, _, _ in started:  # one no test took (say, under -k): SIGTERM stops its children too
            stop(proc, timeout=60)


@pytest.fixture
def launched(_launches):
    """`tgx serve` on the tiny model with the stand-in router, not yet used by any test.

    Yields (launcher process, engine pid, what the router recorded, launcher stderr path).
    """
    proc, out, err = _launches()
    try:
        deadline = time.monotonic() + 240
        while not (out.is_file() and out.stat().st_size):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.2)
        engine_pid = int(re.search(r"engine process started \(pid (\d+)\)", err.read_text()).group(1))
        yield proc, engine_pid, json.loads(out.read_text()), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_starts_the_router_with_its_flags_and_exits_when_the_engine_dies(launched):
    proc, engine_pid, router, err = launched
    argv = router["argv"]
    assert argv[argv.index("--port") + 1] == "0" and argv[argv.index("--max-top-n-tokens") + 1] == "3"
    assert argv[argv.index("--cors-allow-origin") + 1] == "https://a.example"
    assert router["api_key"] == "secret" and "secret" not in argv  # the key never shows in `ps`
    socket_path = argv[argv.index("--socket") + 1]
    assert os.path.exists(socket_path)
    os.kill(engine_pid, signal.SIGKILL)
    assert proc.wait(30) != 0
    assert "engine process exited with code -9 (killed by SIGKILL); stopping the router" in err.read_text()
    assert not _alive(router["pid"])
    assert not os.path.exists(os.path.dirname(socket_path))  # the launcher's temp dir is cleaned up


def test_sigterm_stops_both_children_cleanly(launched):
    proc, engine_pid, router, err = launched
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, err.read_text()[-2000:]
    assert not _alive(engine_pid) and not _alive(router["pid"])
