"""EngineLoop: the one thread that owns an LLMEngine, for the engine server and AsyncEngine alike.

Owns: the single-thread discipline (every command reaches the engine through one queue and is
applied between steps; only this thread touches the engine), the per-step stats snapshot, and
handing each step's whole list of outputs to a publish callback. Must not: touch asyncio or gRPC
(engine.rpc.server and engine.async_engine do, each on its own side of `publish`), or publish per
token: one call per step carries every request's output.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable

from engine.api import RequestOutput, StepStats

log = logging.getLogger("tgx.engine.loop")

Publish = Callable[[list[RequestOutput], StepStats], None]


class EngineLoop:
    """Runs engine.step() on its own thread; `publish` gets each step's outputs (on that thread)."""

    def __init__(self, engine, publish: Publish, on_failure: Callable[[BaseException], None]) -> None:
        self.engine = engine
        self._publish = publish
        self._on_failure = on_failure
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._steps = 0
        self.last_progress = time.monotonic()  # end of the latest loop iteration, idle ones included
        self.error: BaseException | None = None
        self.stats = self._snapshot(0, 0.0)
        self._thread = threading.Thread(target=self._run, name="tgx-engine-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def add(self, request_id: str, ids: list[int], params) -> concurrent.futures.Future:
        """Resolves True once admitted; ValueError if the engine refuses it, RuntimeError if the loop died."""
        return self._command("add", request_id, ids, params)

    def cancel(self, request_id: str) -> concurrent.futures.Future:
        """Resolves to whether the request was found; its final (aborted) output is published."""
        return self._command("cancel", request_id)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._commands.put(("wake", concurrent.futures.Future()))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _command(self, kind: str, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self.error is not None:
            fut.set_exception(RuntimeError(f"engine failed: {self.error!r}"))
        else:
            self._commands.put((kind, fut, *args))
        return fut

    # ---- the loop thread ------------------------------------------------------------------------

    def _apply(self, command: tuple, out: list[RequestOutput]) -> None:
        kind, fut = command[0], command[1]
        try:
            if kind == "add":
                _, _, request_id, ids, params = command
                self.engine.add_request(ids, params, request_id=request_id)
                fut.set_result(True)
            elif kind == "cancel":
                cancelled = self.engine.abort(command[2])
                if cancelled is not None:
                    out.append(cancelled)  # so a client still listening sees its stream end
                fut.set_result(cancelled is not None)
            else:
                fut.set_result(None)
        except ValueError as e:
            fut.set_exception(e)
        except BaseException as e:
            # Anything else kills the loop; the caller waiting on this command must hear it too.
            fut.set_exception(RuntimeError(f"engine failed: {e!r}"))
            raise

    def _snapshot(self, batch_size: int, seconds: float) -> StepStats:
        s = self.engine.stats()
        return StepStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_cache_usage=s.kv_cache_usage,
            num_compiled_programs=s.num_compiled_programs,
            batch_size=batch_size,
            step_seconds=seconds,
            step_index=self._steps,
        )

    def _run(self) -> None:
        try:
            while not self._stopped.is_set():
                outputs: list[RequestOutput] = []
                # Block for work when idle; otherwise take whatever arrived during the last step.
                idle = not self.engine.has_unfinished()
                try:
                    self._apply(
                        self._commands.get(timeout=0.5) if idle else self._commands.get_nowait(), outputs
                    )
                    while True:
                        self._apply(self._commands.get_nowait(), outputs)
                except queue.Empty:
                    pass
                seconds, stepped = 0.0, []
                if not self.engine.has_unfinished() and hasattr(self.engine, "on_idle"):
                    self.engine.on_idle()  # e.g. a multi-host leader's keep-alive to its followers
                if self.engine.has_unfinished():
                    start = time.perf_counter()
                    stepped = self.engine.step()
                    seconds = time.perf_counter() - start
                    self._steps += 1
                outputs.extend(stepped)
                self.last_progress = time.monotonic()
                self.stats = self._snapshot(len(stepped), seconds)
                if outputs:
                    self._publish(outputs, self.stats)
        except BaseException as e:  # noqa: BLE001 - the engine is dead; the owner reports it
            log.exception("engine loop failed")
            self.error = e
            while True:  # commands that will never be applied: answer them, so no caller waits forever
                try:
                    self._commands.get_nowait()[1].set_exception(RuntimeError(f"engine failed: {e!r}"))
                except queue.Empty:
                    break
            self._on_failure(e)
