"""Multi-host bootstrap, the per-step plan broadcast from process 0, and the hung-host watchdog.

Owns: starting jax.distributed from ShardingConfig (flags/env, or jax's own cluster detection on
Cloud TPU VMs, Slurm and Open MPI when nothing is set), the PlanChannel that carries process 0's
step plan to the other processes, and StepWatchdog, which stops a process whose step or plan wait
outlives its deadline. Must not: schedule (process 0's scheduler does; every host then runs the
same engine step on the plan), or serve HTTP (only process 0 does).

How a failure surfaces (measured on CPU, 2 processes x 4 devices, gloo collectives; see
tests/engine/sharding/test_multihost.py):
- a host that dies: a collective in flight with it fails at once as its sockets close (gloo:
  JaxRuntimeError "Connection closed by peer" out of the step, which the engine must treat as
  fatal), and otherwise, after heartbeat_timeout_s without heartbeats, the coordination service
  reports it and jax terminates every other process (SIGABRT, a FATAL log line naming the dead
  task). Either way within seconds; a collective not yet connected just waits for the abort.
- a host that hangs keeps sending heartbeats (a C++ thread does), so jax never notices, and its
  peers block in their next collective forever. StepWatchdog bounds each step, and followers'
  plan waits time out, so the engine exits with EXIT_PEER_FAILURE and a message instead.
- jax's preemption service would catch SIGTERM (the signal launchers stop servers with) and keep
  running; it is switched off, so SIGTERM stops an engine as it does without jax.distributed.
The plan travels through the coordination service's key-value store (about 0.5 ms per step on
localhost): unlike multihost_utils.broadcast_one_to_all (a device collective, about 3 ms on CPU)
it takes bytes of any size and shape, and its reads have a deadline, so a dead or hung process 0
is noticed by the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import jax
import numpy as np

from engine.sharding.config import EXIT_PEER_FAILURE, LayoutError, ShardingConfig

log = logging.getLogger(__name__)

_PLAN_KEY = "tgx/plan/{}"
SHUTDOWN_TIMEOUT_S = 30
_PLANS_KEPT = 16  # followers trail process 0 by a step or two: the step's collectives keep them close


class PeerFailure(RuntimeError):
    """Another process died or hung; this engine cannot continue."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    process_id: int
    num_processes: int

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def initialize(cfg: ShardingConfig) -> ProcessInfo:
    """Starts jax.distributed when the config or the cluster environment calls for it.

    Must run before anything touches a jax device. With nothing set, jax's cluster detection
    decides (one process on a plain machine); NUM_PROCESSES=1 skips it altogether.
    """
    if cfg.num_processes == 1 and cfg.coordinator_address is None:
        return ProcessInfo(0, 1)
    # Off before the client starts: it would turn SIGTERM into a "preemption notice" and keep running.
    jax.config.update("jax_enable_preemption_service", False)
    # CPU processes need a collectives library to talk to each other (GPUs use NCCL, TPUs ICI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.initialization_timeout_s,
            heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
            # A clean stop waits this long for every process to reach shutdown together.
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
        )
    except ValueError as e:  # nothing set and no cluster detected, or a partial setting
        if cfg.is_multi_host_requested:
            raise LayoutError(
                f"multi-host start-up needs --coordinator-address, --num-processes and --process-id "
                f"(or a cluster jax detects: Cloud TPU, Slurm, Open MPI): {e}"
            ) from e
        return ProcessInfo(0, 1)
    except RuntimeError as e:  # jax already running single-process (a library caller, tests)
        if cfg.is_multi_host_requested:
            raise LayoutError(f"cannot start multi-host jax: {e}") from e
        return ProcessInfo(jax.process_index(), jax.process_count())
    info = ProcessInfo(jax.process_index(), jax.process_count())
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", info.process_id,
             info.num_processes, jax.local_device_count(), jax.device_count())
    return info


def _coordination_client():
    # jax exposes no public handle on the coordination service's key-value store; this is the
    # one place that reaches for it, so a jax upgrade that moves it breaks here, loudly.
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: there is no plan to broadcast")
    return client


class PlanChannel:
    """Process 0 publishes one payload per step; every other process receives them in order.

    An empty payload is a keep-alive: process 0 sends one whenever it has been idle for half the
    timeout, so followers can tell an idle leader from a dead or hung one.
    """

    def __init__(self, info: ProcessInfo, *, timeout_s: float) -> None:
        self.info = info
        self.timeout_s = timeout_s
        self._client = _coordination_client() if info.num_processes > 1 else None
        self._next = 0
        self._last_publish = time.monotonic()

    def publish(self, payload: bytes) -> None:
        if not self.info.is_leader:
            raise RuntimeError("only process 0 publishes step plans")
        if self._client is not None:
            self._client.key_value_set_bytes(_PLAN_KEY.format(self._next), payload)
            if self._next >= _PLANS_KEPT:
                self._client.key_value_delete(_PLAN_KEY.format(self._next - _PLANS_KEPT))
        self._next += 1
        self._last_publish = time.monotonic()

    def barrier(self, name: str, timeout_s: float) -> None:
        """Waits until every process reaches `name` (e.g. the end of warmup); PeerFailure on timeout."""
        if self._client is None:
            return
        try:
            self._client.wait_at_barrier(f"tgx/{name}", int(timeout_s * 1000))
        except jax.errors.JaxRuntimeError as e:
            raise PeerFailure(f"process {self.info.process_id}: not every process reached {name} within "
                              f"{timeout_s:g} s ({str(e).splitlines()[0]})") from e

    def keepalive_due(self) -> bool:
        return time.monotonic() - self._last_publish > self.timeout_s / 2

    def receive(self) -> bytes:
        """The next payload (b"" for a keep-alive); PeerFailure when none comes within the timeout."""
        if self.info.is_leader or self._client is None:
            raise RuntimeError("process 0 does not receive step plans")
        key = _PLAN_KEY.format(self._next)
        try:
            payload = self._client.blocking_key_value_get_bytes(key, int(self.timeout_s * 1000))
        except jax.errors.JaxRuntimeError as e:
            raise PeerFailure(
                f"process {self.info.process_id}: no step plan from process 0 within {self.timeout_s:g} s "
                f"(step {self._next}); process 0 is dead or hung ({str(e).splitlines()[0]})"
            ) from e
        self._next += 1
        return payload


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A plan's arrays as bytes (npz: typed, shaped, no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def decode_arrays(payload: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _exit_peer_failure(message: str) -> None:
    log.critical(message)
    sys.stderr.write(f"tgx: fatal: {message}\n")
    sys.stderr.flush()
    # os._exit: a thread blocked in a collective never returns, so a clean interpreter exit
    # (joining threads, atexit) could hang just as the step did.
    os._exit(EXIT_PEER_FAILURE)


class StepWatchdog:
    """Bounds each step: one still running after `timeout_s` calls on_timeout (default: exit).

    A step blocked in a collective on a hung host cannot be interrupted from Python; the only
    way to fail loudly, rather than hang with the server still answering, is to end the process.
    """

    def __init__(self, timeout_s: float, *, on_timeout: Callable[[str], None] = _exit_peer_failure,
                 name: str = "engine") -> None:
        self.timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._name = name
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def step(self, what: str = "step") -> Iterator[None]:
        with self._cond:
            self._deadline, self._what = time.monotonic() + self.timeout_s, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                what, self._deadline = self._what, None
                message = (f"{self._name} {what} did not finish within {self.timeout_s:g} s: "
                           "a host is hung or dead (or the step timeout is too short)")
                self._cond.release()
                try:
                    self._on_timeout(message)
                finally:
                    self._cond.acquire()
