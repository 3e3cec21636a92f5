"""AsyncEngine: the streaming interface over an LLMEngine, for the router and async callers.

Owns: the hand-off between the engine's loop (engine.engine_loop.EngineLoop, the same loop the
engine server runs) and asyncio callers: each step's published outputs are routed to the stream of
the request they belong to, on that caller's event loop.
Must not: touch the LLMEngine from the caller's thread (validation aside: it only tokenizes and
checks limits), keep its own loop or command queue (EngineLoop owns both), or leave a request
running once its caller stops listening.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from engine.api import EngineInfo, RequestOutput
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.rpc.codec import StepStats
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop failed; every in-flight and later request gets this."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        # Called from the engine's loop thread: asyncio queues are only safe on their own loop.
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.info: EngineInfo = engine.info
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # _streams is read on the loop thread, written on callers' loops
        self._engine_loop = EngineLoop(engine, publish=self._publish, on_failure=self._fail)
        self._engine_loop.start()

    @property
    def is_healthy(self) -> bool:
        return self._engine_loop.is_alive()

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        if self._engine_loop.error is not None:
            raise EngineDeadError(str(self._engine_loop.error))
        ids = self.engine.validate(prompt, params)  # ValueError reaches the caller before anything is queued
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        # Not awaited: the stream is where the outcome arrives, so a refusal (or the loop dying
        # before admission) is put on it rather than waited for separately.
        self._engine_loop.add(request_id, ids, params).add_done_callback(
            lambda fut: self._admitted(request_id, fut)
        )
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
                self._engine_loop.cancel(request_id)

    async def abort(self, request_id: str) -> None:
        self._engine_loop.cancel(request_id)

    def shutdown(self) -> None:
        self._engine_loop.stop(timeout=30)

    # ---- callbacks from the loop thread ---------------------------------------------------------

    def _admitted(self, request_id: str, fut: concurrent.futures.Future) -> None:
        e = fut.exception()
        if isinstance(e, ValueError):  # the engine refused it (e.g. no room for it at all)
            self._deliver(request_id, e)
        elif e is not None:  # the loop died before applying it
            self._deliver(request_id, EngineDeadError(str(e)))

    def _publish(self, outputs: list[RequestOutput], stats: StepStats) -> None:
        for out in outputs:
            self._deliver(out.request_id, out)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(EngineDeadError(f"engine failed: {error!r}"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)
