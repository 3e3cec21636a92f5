"""AsyncEngine: the streaming interface over an LLMEngine, for the router and async callers.

Owns: the engine's loop thread and the hand-off between it and asyncio callers. Every command
(add, abort) reaches the engine through one queue and is applied between steps, so the LLMEngine is
only ever touched by the loop thread. Outputs go back per step to each caller's event loop.
Must not: do model work on the caller's thread (tokenizing for validation aside) or leave a request
running once its caller stops listening.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from engine.api import EngineInfo, RequestOutput
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight and later request gets this."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.info: EngineInfo = engine.info
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tgx-engine", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        ids = self.engine.validate(prompt, params)  # ValueError reaches the caller before anything is queued
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, ids, params))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:  # the caller left early (disconnect, cancel, error): free its pages
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopped.set()
        self._commands.put(("wake",))
        self._thread.join(timeout=30)

    # ---- the loop thread -----------------------------------------------------------------------

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, ids, params = command
            try:
                self.engine.add_request(ids, params, request_id=request_id)
            except ValueError as e:
                self._deliver(request_id, e)
        elif kind == "abort":
            out = self.engine.abort(command[1])
            if out is not None:
                self._deliver(out.request_id, out)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _loop(self) -> None:
        try:
            while not self._stopped.is_set():
                # Block for work when idle; otherwise take whatever arrived during the last step.
                block = not self.engine.has_unfinished()
                try:
                    self._apply(self._commands.get(timeout=0.5) if block else self._commands.get_nowait())
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    pass
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - the engine is dead; tell every waiter why
            log.exception("engine loop failed")
            self._error = e
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:
                stream.put(EngineDeadError(f"engine failed: {e!r}"))
