"""Two processes x 4 CPU devices on localhost behave as one 8-device engine, and fail loudly together.

Owns: a sharded greedy run over the global 8-device mesh (the model split across both hosts, and
one replica per host), driven by process 0's broadcast plans, matching the single-process
unsharded run; and how a dead host, a hung host and a hung process 0 end the run within seconds
instead of hanging. Must not: leave processes behind (each test kills what it started) or depend
on timing tighter than a slow CI machine allows (margins are several seconds).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from engine.sharding.config import EXIT_PEER_FAILURE
from tests.engine.sharding import harness as H
from tests.support import JAX_CACHE, REPO

# jax's coordination service aborts every process after this long without heartbeats. 3 s was
# too tight on a loaded 2-core CI machine (both hosts were declared dead while loading the model).
HEARTBEAT_S = 10
STEP_TIMEOUT_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Hosts:
    """The two worker processes of one test, their logs, and their cleanup."""

    def __init__(self, out: pathlib.Path, mode: str, *, dp: int = 1, tp: int = 8,
                 step_timeout: float = STEP_TIMEOUT_S) -> None:
        self.out = out
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   PYTHONPATH=str(REPO), TGX_TEST_JAX_CACHE=str(JAX_CACHE), PYTHONUNBUFFERED="1")
        port = _free_port()
        self.procs = []
        for pid in range(2):
            cmd = [sys.executable, "-m", "tests.engine.sharding.multihost_worker", "--process-id", str(pid),
                   "--port", str(port), "--mode", mode, "--out", str(out), "--dp", str(dp), "--tp", str(tp),
                   "--heartbeat", str(HEARTBEAT_S), "--step-timeout", str(step_timeout)]
            log = open(out / f"worker{pid}.log", "w")  # noqa: SIM115 - closed with the process
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        self.exit_times: dict[int, float] = {}

    def log(self, pid: int) -> str:
        return (self.out / f"worker{pid}.log").read_text()

    def wait_for(self, pid: int, text: str, timeout: float) -> float:
        """Seconds since the epoch at which `text` showed up in a worker's log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log(pid):
                return time.monotonic()
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.05)
        raise AssertionError(f"worker {pid} never logged {text!r}:\n{self.log(0)}\n---\n{self.log(1)}")

    def wait_exit(self, pid: int, timeout: float) -> tuple[int, float]:
        proc = self.procs[pid]
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {pid} still running after {timeout} s:\n{self.log(0)}\n---\n{self.log(1)}"
            ) from None
        return rc, time.monotonic()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: a process stuck in a collective ignores nothing else reliably
                p.wait()


@pytest.fixture
def hosts(tmp_path):
    started = []

    def start(mode: str, **kw) -> Hosts:
        h = Hosts(tmp_path, mode, **kw)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


# One replica per host (dp 2 x tp 4) runs through the whole engine and HTTP in test_multihost_serve.
@pytest.mark.parametrize("dp,tp", [(1, 8)], ids=["tp8-across-hosts"])
def test_two_hosts_match_one(hosts, tmp_path, dp, tp):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")
    _, tensors, run = H.unsharded("llama", seed=seed)
    batches = [H.prompts(seed + 1), H.prompts(seed + 2, (6, 14, 9))][:dp]
    seeds = [seed + i for i in range(dp)]
    np.savez(tmp_path / "tensors.npz", **tensors)
    (tmp_path / "spec.json").write_text(json.dumps(dict(model="llama", batches=batches, seeds=seeds)))
    h = hosts("forward", dp=dp, tp=tp, step_timeout=120.0)  # its first step compiles
    want = [run(b, seed=s) for b, s in zip(batches, seeds, strict=True)]  # while the workers start
    for pid in (0, 1):
        rc, _ = h.wait_exit(pid, timeout=240)
        assert rc == 0, h.log(pid)
    tokens = json.loads((tmp_path / "tokens.json").read_text())
    with np.load(tmp_path / "runs.npz") as z:
        for r in range(dp):
            got = H.Run(logits=[z[f"{r}_{i}"] for i in range(H.DECODE_STEPS + 1)], tokens=tokens[r])
            H.assert_same_run(got, want[r], f"replica {r} on 2 hosts")
    report = (tmp_path / "report.txt").read_text()
    assert f"data={dp} x model={tp} over 8 cpu devices on 2 hosts" in report
    if dp == 2:  # each replica stays on one host
        assert "replica 0: devices 0,1,2,3 (host 0)" in report and "(host 1)" in report
    else:
        assert "(hosts 0,1)" in report


def test_dead_host_stops_the_others(hosts):
    h = hosts("die")
    h.wait_for(1, "dying", timeout=120)
    rc1, died = h.wait_exit(1, timeout=10)
    rc0, stopped = h.wait_exit(0, timeout=HEARTBEAT_S + 20)
    # Whichever comes first: the collective in flight fails as the dead peer's sockets close or
    # reset (an exception from the step), or jax's coordination service misses its heartbeats and aborts
    # every other process.
    assert rc1 == 1 and rc0 != 0
    assert stopped - died < HEARTBEAT_S + 15
    log = h.log(0)
    assert re.search(r"Gloo \w+ failed: .*(closed|reset) by peer|stopped sending heartbeats", log), log


def test_hung_host_trips_the_watchdog(hosts):
    h = hosts("hang")
    hung = h.wait_for(1, "hanging", timeout=120)
    rc0, stopped = h.wait_exit(0, timeout=STEP_TIMEOUT_S + 20)
    # Heartbeats go on from a hung process, so jax never notices: the step watchdog does.
    assert rc0 == EXIT_PEER_FAILURE, h.log(0)
    assert stopped - hung < STEP_TIMEOUT_S + 15
    assert "did not finish within 4 s: a host is hung or dead" in h.log(0)


def test_hung_leader_is_noticed_by_the_others(hosts):
    h = hosts("leader-hang")
    hung = h.wait_for(0, "leader hanging", timeout=120)
    rc1, stopped = h.wait_exit(1, timeout=STEP_TIMEOUT_S + 20)
    assert rc1 == 3, h.log(1)
    assert stopped - hung < STEP_TIMEOUT_S + 15
    assert "no step plan from process 0 within 4 s (step 3); process 0 is dead or hung" in h.log(1)
