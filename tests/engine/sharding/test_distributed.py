"""The single-process side of engine/sharding/distributed.py: bootstrap decisions, plans, watchdog.

Owns: what initialize() does when there is one host (or jax already runs), the plan encoding, and
the step watchdog's deadline. Must not: start a real multi-process run (test_multihost.py does).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engine.sharding import distributed
from engine.sharding.config import LayoutError, ShardingConfig
from tests.support import REPO


def test_initialize_single_host():
    import jax

    assert distributed.initialize(ShardingConfig(num_processes=1)) == distributed.ProcessInfo(0, 1)
    jax.devices()  # jax is running (as in a library caller, or any test process)
    # Nothing set and jax already started (a library caller): one process, no error.
    assert distributed.initialize(ShardingConfig()).num_processes == 1
    with pytest.raises(LayoutError, match="cannot start multi-host jax"):
        distributed.initialize(
            ShardingConfig(coordinator_address="localhost:1", num_processes=2, process_id=1)
        )


def test_initialize_on_a_plain_machine_is_one_process():
    # A fresh interpreter: nothing set, no cluster to detect -> no jax.distributed, one process.
    code = ("from engine.sharding import distributed; from engine.sharding.config import ShardingConfig\n"
            "import jax; info = distributed.initialize(ShardingConfig())\n"
            "assert info == distributed.ProcessInfo(0, 1), info; assert jax.process_count() == 1\n"
            "from jax._src import distributed as d; assert d.global_state.client is None\n")
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_plan_encoding_round_trips():
    rng = np.random.default_rng()
    plan = {"input_ids": rng.integers(0, 1000, (2, 48)).astype(np.int32),
            "page_table": rng.integers(0, 9, (2, 4, 12)).astype(np.int32),
            "temperature": rng.random(4).astype(np.float32)}
    back = distributed.decode_arrays(distributed.encode_arrays(plan))
    assert set(back) == set(plan)
    for k, v in plan.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_single_process_channel():
    channel = distributed.PlanChannel(distributed.ProcessInfo(0, 1), timeout_s=1.0)
    channel.publish(b"plan")  # nobody listens; nothing to do
    with pytest.raises(RuntimeError, match="does not receive"):
        channel.receive()
    follower = distributed.ProcessInfo(1, 2)
    assert not follower.is_leader


def test_watchdog_fires_only_on_overrun():
    fired: list[str] = []
    done = threading.Event()

    def on_timeout(message: str) -> None:
        fired.append(message)
        done.set()

    dog = distributed.StepWatchdog(0.3, on_timeout=on_timeout, name="test")
    try:
        for _ in range(3):
            with dog.step("quick"):
                time.sleep(0.01)
        time.sleep(0.5)  # disarmed between steps: idle time never counts
        assert fired == []
        with dog.step("step 7"):
            assert done.wait(5)
        assert fired == [("test step 7 did not finish within 0.3 s: a host is hung or dead "
                          "(or the step timeout is too short)")]
        with dog.step("after"):  # still usable after firing
            pass
    finally:
        dog.close()
