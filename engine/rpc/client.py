"""RemoteEngine: the EngineClient the router uses, talking to the engine server over gRPC.

Owns: the channel to the engine's Unix socket, the ONE Events stream (each message is one engine
step's outputs for every request) and its demultiplexing to per-request asyncio queues, Cancel when a
caller stops listening, and noticing that the engine is gone. Must not: import jax (the router
process never does), or keep a request running in the engine after its caller left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from engine.api import EngineInfo, ProfilerBusyError, ProfileResult, RequestOutput, StepStats
from engine.rpc import codec
from engine.rpc import engine_pb2 as pb
from engine.rpc import engine_pb2_grpc as pb_grpc
from engine.sampling_params import SamplingParams

log = logging.getLogger("tgx.engine.client")

RPC_TIMEOUT_S = 30.0  # unary calls; the engine answers between steps, so far faster in practice
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]

__all__ = ["EngineUnavailableError", "Health", "ProfilerBusyError", "RemoteEngine", "StepStats"]


class EngineUnavailableError(RuntimeError):
    """The engine process is gone or unreachable; every in-flight and later request gets this."""


@dataclasses.dataclass(frozen=True)
class Health:
    healthy: bool
    reason: str = ""

    def __bool__(self) -> bool:  # `if await engine.health():` reads naturally
        return self.healthy


class RemoteEngine:
    """`await RemoteEngine.connect(path)` in the event loop that will use it; `await close()` at the end."""

    def __init__(
        self, channel: grpc.aio.Channel, info: EngineInfo, on_step: Callable[[StepStats], None] | None
    ):
        self._channel = channel
        self._stub = pb_grpc.EngineStub(channel)
        self.info = info
        self._on_step = on_step
        self._queues: dict[str, asyncio.Queue] = {}
        self._failure: str | None = None
        self._tasks: set[asyncio.Task] = set()  # fire-and-forget Cancels, kept alive until done
        self._events: grpc.aio.UnaryStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self.last_stats = StepStats()

    @classmethod
    async def connect(
        cls, socket_path: str, timeout: float = 60.0, on_step: Callable[[StepStats], None] | None = None
    ) -> RemoteEngine:
        """Waits up to `timeout` s for the server, then subscribes to Events.

        EngineUnavailableError if no engine answers in time.

        `on_step` is called (on the event loop) with every step's StepStats, e.g. for metrics.
        """
        channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=GRPC_OPTIONS)
        deadline = time.monotonic() + timeout
        stub = pb_grpc.EngineStub(channel)
        while True:
            try:
                info = codec.info_from_pb(await stub.Info(pb.InfoRequest(), timeout=2.0, wait_for_ready=True))
                break
            except grpc.aio.AioRpcError as e:
                if time.monotonic() >= deadline:
                    await channel.close()
                    raise EngineUnavailableError(
                        f"no engine answered on {socket_path} within {timeout:g} s ({e.code().name})"
                    ) from None
                await asyncio.sleep(0.2)
        self = cls(channel, info, on_step)
        try:
            await self._subscribe(max(deadline - time.monotonic(), 5.0))
        except BaseException:
            await channel.close()
            raise
        return self

    async def _subscribe(self, timeout: float) -> None:
        self._events = self._stub.Events(pb.EventsRequest())
        try:
            # The server's first message says the subscription is live: no output can be missed after it.
            first = await asyncio.wait_for(self._events.read(), timeout)
        except (TimeoutError, grpc.aio.AioRpcError) as e:
            raise EngineUnavailableError(f"could not subscribe to engine events: {e}") from None
        if first is grpc.aio.EOF:
            raise EngineUnavailableError("the engine closed its event stream")
        self.last_stats = codec.stats_from_pb(first.stats)
        self._reader = asyncio.create_task(self._read_events(), name="tgx-engine-events")

    async def _read_events(self) -> None:
        reason = "the engine closed its event stream"
        try:
            while True:
                # read(), not `async for`: grpc.aio forbids mixing the two on one call.
                event = await self._events.read()
                if event is grpc.aio.EOF:
                    break
                for m in event.outputs:
                    q = self._queues.get(m.request_id)
                    if q is not None:  # None: the caller already left (its Cancel is on the way)
                        q.put_nowait(codec.output_from_pb(m))
                self.last_stats = codec.stats_from_pb(event.stats)
                if self._on_step is not None:
                    try:
                        self._on_step(self.last_stats)
                    except Exception:  # a metrics bug must not stop token delivery
                        log.exception("on_step callback failed")
        except grpc.aio.AioRpcError as e:
            reason = f"engine connection lost: {e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            reason = "engine client closed"
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
            log.error("engine unavailable: %s", reason)
        for q in self._queues.values():
            q.put_nowait(EngineUnavailableError(reason))

    # ---- EngineClient -------------------------------------------------------------------------

    @property
    def is_healthy(self) -> bool:
        return self._failure is None

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs. ValueError: rejected by validation (the engine's message).

        EngineUnavailableError: the engine is gone. Leaving the iteration early cancels the request.
        """
        if self._failure is not None:
            raise EngineUnavailableError(self._failure)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        # Registered before Submit: the first tokens may arrive on Events before Submit's answer does.
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = rejected = False
        try:
            try:
                await self._stub.Submit(
                    codec.submit_request(request_id, prompt, params), timeout=RPC_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    rejected = True
                    raise ValueError(e.details()) from None
                raise EngineUnavailableError(
                    f"engine did not accept the request: {e.code().name}: {e.details()}"
                ) from None
            while not finished:
                item = await q.get()
                if isinstance(item, BaseException):
                    rejected = True  # the engine is gone; nothing to cancel
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not (finished or rejected) and self._failure is None:
                # The caller left early (disconnect, cancel): free the request's KV pages in the engine.
                task = asyncio.get_running_loop().create_task(self._cancel(request_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self._stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            log.warning("could not cancel request %s: %s", request_id, e.code().name)

    async def abort(self, request_id: str) -> None:
        """Cancels a request by id; its stream (if someone listens) ends with finish_reason "cancelled"."""
        if self._failure is None:
            await self._cancel(request_id)

    async def health(self) -> Health:
        if self._failure is not None:
            return Health(False, self._failure)
        try:
            r = await self._stub.Health(pb.HealthRequest(), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            return Health(False, f"engine does not answer: {e.code().name}")
        return Health(r.healthy, r.reason)

    async def stats(self) -> StepStats:
        """The engine's current stats (the latest step's, with the live running/waiting counts)."""
        if self._failure is not None:
            raise EngineUnavailableError(self._failure)
        try:
            return codec.stats_from_pb(await self._stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S))
        except grpc.aio.AioRpcError as e:
            raise EngineUnavailableError(f"engine does not answer: {e.code().name}") from None

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            r = await self._stub.Tokenize(
                pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens), timeout=RPC_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise EngineUnavailableError(f"engine does not answer: {e.code().name}") from None
        return list(r.ids)

    async def profile(self, seconds: float) -> ProfileResult:
        """Traces the engine process for `seconds`; answers once the trace files are written.

        ValueError: seconds out of range (the engine's message). ProfilerBusyError: another trace runs.
        """
        if self._failure is not None:
            raise EngineUnavailableError(self._failure)
        try:
            # Writing a busy trace (and its Perfetto copy) can take a while after the capture ends.
            wait = min(seconds, 3600.0) if math.isfinite(seconds) and seconds > 0 else 0.0  # the engine checks it
            r = await self._stub.Profile(pb.ProfileRequest(seconds=seconds), timeout=wait + 300)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            if e.code() == grpc.StatusCode.ABORTED:
                raise ProfilerBusyError(e.details()) from None
            raise EngineUnavailableError(f"engine does not answer: {e.code().name}: {e.details()}") from None
        return ProfileResult(
            trace_dir=r.trace_dir, xplane=r.xplane, perfetto_trace=r.perfetto_trace, seconds=r.seconds
        )

    async def close(self) -> None:
        if self._failure is None:
            self._failure = "engine client closed"  # set first, so the reader's end is not logged as an error
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        await self._channel.close()
