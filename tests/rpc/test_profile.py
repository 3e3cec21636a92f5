"""Profiler traces of the engine process.

Owns: the Profile RPC against a real engine server (tiny random-weight Llama, `--random-weights`):
a capture while requests run writes an XProf .xplane.pb and a Perfetto trace holding the engine's
tgx.* phases and the model's per-layer named scopes; a second capture meanwhile is refused
(ProfilerBusyError); out-of-range seconds are ValueErrors. `--profile-dir` on serve() (a stand-in
engine, no compile): traced from ready to shutdown, captures refused meanwhile; and `tgx serve`
handing both flags to the engine process. Must not: depend on the router.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile

import pytest

from tests.rpc import JAX_CACHE, REPO, SERVER_FLAGS, FakeEngine, server_env, stop, wait_for_socket
from tests.tiny_config import write_tiny_config

pytestmark = pytest.mark.timeout(600)

PHASES = ("step", "schedule", "prepare_inputs", "device_execute", "sample", "wait", "outputs")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_config(tmp_path_factory.mktemp("tiny-config"))
    sock = os.path.join(tempfile.mkdtemp(prefix="tgx-test-"), "engine.sock")
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "engine.rpc.server", "--socket", sock, "--model-id", str(model),
        "--random-weights", *SERVER_FLAGS, "--compilation-cache-dir", str(JAX_CACHE),
    ]  # fmt: skip
    JAX_CACHE.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=server_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(proc, sock, log_path)
        yield sock
    finally:
        stop(proc)


@pytest.mark.asyncio
async def test_capture_while_serving(server):
    from engine.rpc.client import ProfilerBusyError, RemoteEngine
    from engine.sampling_params import SamplingParams

    engine = await RemoteEngine.connect(server, timeout=30)
    try:
        seconds = round(random.uniform(1.5, 2.0), 2)
        capture = asyncio.create_task(engine.profile(seconds))
        rng = random.Random()
        prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(5, 40))] for _ in range(3)]
        params = SamplingParams(max_new_tokens=60, ignore_eos=True)

        async def run(prompt):
            return [o async for o in engine.generate(prompt, params)]

        generated = asyncio.gather(*(run(p) for p in prompts))
        await asyncio.sleep(0.5)
        with pytest.raises(ProfilerBusyError, match="already being captured"):
            await engine.profile(1.0)
        result = await capture
        outs = await generated
        assert [o[-1].num_generated_tokens for o in outs] == [60] * 3

        assert result.seconds >= seconds
        assert os.path.isfile(result.xplane) and result.xplane.endswith(".xplane.pb")
        assert os.path.isfile(result.perfetto_trace) and result.perfetto_trace.endswith(
            "perfetto_trace.json.gz"
        )
        assert result.xplane.startswith(result.trace_dir + os.sep)
        with gzip.open(result.perfetto_trace) as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        names = {e.get("name") for e in events}
        assert {f"tgx.{p}" for p in PHASES} <= names, sorted(n for n in names if n and n.startswith("tgx"))
        # The device programs carry the model's named scopes (in their HLO metadata): per layer,
        # attention and MLP, as XProf's trace viewer and op profile show them.
        xplane = pathlib.Path(result.xplane).read_bytes()
        for scope in (b"forward/layers.0/attention", b"forward/layers.1/mlp", b"sample"):
            assert scope in xplane, scope

        for bad in (0.5, 121.0, float("nan")):
            with pytest.raises(ValueError, match="between 1 and 120"):
                await engine.profile(bad)
    finally:
        await engine.close()


class _TinyEngine(FakeEngine):
    """For serve(): a few tokens per request (running: tokens left), each step a tgx.step range."""

    def add_request(self, ids, params, request_id):
        self.running[request_id] = params.max_new_tokens

    def step(self):
        from engine.api import GeneratedToken, RequestOutput
        from engine.profiling import phase

        with phase("step"):
            outs = []
            for rid in list(self.running):
                self.running[rid] -= 1
                done = self.running[rid] == 0
                outs.append(RequestOutput(rid, (GeneratedToken(3, "x", 0.0, False),), "x", done,
                                          "length" if done else None, 2, 1))  # fmt: skip
                if done:
                    del self.running[rid]
            return outs


@pytest.mark.asyncio
async def test_profile_dir_traces_ready_to_shutdown(tmp_path):
    from engine.rpc.client import ProfilerBusyError, RemoteEngine
    from engine.rpc.server import serve
    from engine.sampling_params import SamplingParams

    sock = os.path.join(tempfile.mkdtemp(prefix="tgx-test-"), "engine.sock")
    stop_event = asyncio.Event()
    profiles = tmp_path / "profiles"
    server = asyncio.create_task(serve(_TinyEngine(), sock, stop=stop_event, profile_dir=str(profiles)))
    engine = await RemoteEngine.connect(sock, timeout=30)
    try:
        n = random.randint(3, 9)
        outs = [o async for o in engine.generate([5, 6], SamplingParams(max_new_tokens=n))]
        assert len(outs) == n and outs[-1].finished
        with pytest.raises(ProfilerBusyError, match=r"serve-"):  # the whole-run trace holds the profiler
            await engine.profile(1.0)
    finally:
        await engine.close()
    stop_event.set()
    assert await asyncio.wait_for(server, 60) == 0
    (run,) = profiles.glob("serve-*")  # written at shutdown
    (xplane,) = run.glob("plugins/profile/*/*.xplane.pb")
    (perfetto,) = run.glob("plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(perfetto) as f:
        trace = json.load(f)
    steps = [
        e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("name") == "tgx.step"
    ]
    assert len(steps) >= n and xplane.stat().st_size > 0


def test_serve_passes_profile_flags_to_the_engine(tmp_path, capsys):
    import argparse

    from engine.launcher import PROFILE_STOP_TIMEOUT_S, STOP_TIMEOUT_S, add_serve_flags, main, plan

    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    d = str(tmp_path / "p")
    p = plan(parser.parse_args(["--profile-dir", d, "--random-weights", "--model-id", "cfg"]))
    cmd = list(p.engine_cmd)
    assert cmd[cmd.index("--profile-dir") + 1] == d and "--random-weights" in cmd
    assert "--profile-dir" not in p.router_cmd and "--random-weights" not in p.router_cmd
    # Writing a whole run's trace at shutdown takes a while: the launcher waits longer for it.
    assert p.engine_stop_timeout == PROFILE_STOP_TIMEOUT_S > STOP_TIMEOUT_S
    assert plan(parser.parse_args([])).engine_stop_timeout == STOP_TIMEOUT_S
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--profile-dir", str(blocker / "sub")]) == 2  # nothing started
    err = capsys.readouterr().err
    assert "tgx: error: --profile-dir" in err and "Traceback" not in err
