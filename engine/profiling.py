"""Profiler: JAX profiler traces of the engine process, on demand, and the engine's phase names.

Owns: one trace at a time (jax.profiler allows no more), each written into its own directory under
a base directory as XProf `.xplane.pb` plus a Perfetto `perfetto_trace.json.gz`; a whole-run trace
(`--profile-dir`: start at ready, stop at shutdown) and timed captures (the engine server's Profile
RPC, behind the router's POST /admin/profile); `phase`, the host-side annotation every engine phase
is wrapped in. Must not: block the engine loop (a capture waits on its caller's thread, never the
engine's), or decide what is traced beyond the phases: the model's named scopes name device ops.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import threading
import time

import jax

from engine.api import ProfilerBusyError, ProfileResult

__all__ = ["MAX_CAPTURE_SECONDS", "MIN_CAPTURE_SECONDS", "Profiler", "ProfilerBusyError", "phase"]

log = logging.getLogger("tgx.profiler")

MIN_CAPTURE_SECONDS = 1.0
MAX_CAPTURE_SECONDS = 120.0


def phase(name: str, **args: int) -> jax.profiler.TraceAnnotation:
    """A host-side trace range `tgx.<name>`; costs next to nothing while no trace is running.
    `args` show as the range's arguments in the trace (e.g. a step's tokens and bucket)."""
    return jax.profiler.TraceAnnotation(f"tgx.{name}", **args)


def check_seconds(seconds: float) -> float:
    """ValueError unless `seconds` is a capture length we accept."""
    if not MIN_CAPTURE_SECONDS <= seconds <= MAX_CAPTURE_SECONDS:
        raise ValueError(
            f"`seconds` must be between {MIN_CAPTURE_SECONDS:g} and {MAX_CAPTURE_SECONDS:g}, got {seconds:g}"
        )
    return seconds


def _options() -> jax.profiler.ProfileOptions:
    opts = jax.profiler.ProfileOptions()
    # The Python tracer records every Python call: it slows the engine loop several-fold and makes a
    # serving run's trace gigabytes. The tgx.* phase annotations carry the host side instead.
    opts.python_tracer_level = 0
    return opts


class Profiler:
    def __init__(self, base_dir: str | None = None) -> None:
        """base_dir None: captures go to a new temporary directory, made on first use."""
        self._base_dir = os.path.abspath(base_dir) if base_dir else None
        self._lock = threading.Lock()
        self._active: str | None = None
        self._started = 0.0

    @property
    def base_dir(self) -> str:
        if self._base_dir is None:
            self._base_dir = tempfile.mkdtemp(prefix="tgx-profile-")
        return self._base_dir

    @property
    def active(self) -> str | None:
        return self._active

    def start(self, tag: str) -> str:
        """Starts a trace into base_dir/<tag>-<time>; ProfilerBusyError if one is running."""
        with self._lock:
            if self._active is not None:
                raise ProfilerBusyError(f"a profile is already being captured into {self._active}")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = os.path.join(self.base_dir, f"{tag}-{stamp}")
            n = 1
            while os.path.exists(path):  # two captures in one second each get their own directory
                n += 1
                path = os.path.join(self.base_dir, f"{tag}-{stamp}-{n}")
            os.makedirs(path)
            try:
                jax.profiler.start_trace(path, create_perfetto_trace=True, profiler_options=_options())
            except RuntimeError as e:  # someone else in this process (a notebook, a test) holds it
                raise ProfilerBusyError(f"the JAX profiler is already running: {e}") from None
            self._active, self._started = path, time.monotonic()
            log.info("profiling into %s", path)
            return path

    def stop(self) -> ProfileResult | None:
        """Stops the running trace (if any); returns where it was written once the files exist."""
        with self._lock:
            path, self._active = self._active, None
            if path is None:
                return None
            seconds = time.monotonic() - self._started
            jax.profiler.stop_trace()  # writes the files: seconds for a long or busy trace
        result = _result(path, seconds)
        log.info(
            "profile of %.1f s written to %s (perfetto: %s)", seconds, path, result.perfetto_trace or "none"
        )
        return result

    def capture(self, seconds: float) -> ProfileResult:
        """Traces the next `seconds` of whatever the process runs; blocks the caller, not the engine."""
        check_seconds(seconds)
        self.start("capture")
        time.sleep(seconds)
        result = self.stop()
        assert result is not None
        return result


def _result(path: str, seconds: float) -> ProfileResult:
    # jax writes <logdir>/plugins/profile/<run>/<host>.xplane.pb (+ perfetto_trace.json.gz).
    def newest(pattern: str) -> str:
        found = glob.glob(os.path.join(path, "plugins", "profile", "*", pattern))
        return max(found, key=os.path.getmtime) if found else ""

    return ProfileResult(
        trace_dir=path,
        xplane=newest("*.xplane.pb"),
        perfetto_trace=newest("perfetto_trace.json.gz"),
        seconds=round(seconds, 3),
    )
