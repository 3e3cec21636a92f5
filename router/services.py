"""Services: the app-scoped objects handlers receive by dependency injection.

Owns: one bundle per app of settings, engine client, tokenizer, metrics, tracer and limiter, and
the SSE response helper every streaming route uses. Must not: hold per-request state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream
from opentelemetry import trace

from engine.api import EngineClient, EngineInfo
from router.metrics import Metrics
from router.errors import RouterError
from router.observe import Limiter, Permit, RequestTracker
from router.settings import RouterSettings
from router.tokenizer import RouterTokenizer

_encoder = msgspec.json.Encoder()


@dataclasses.dataclass
class Services:
    settings: RouterSettings
    engine: EngineClient
    tokenizer: RouterTokenizer
    metrics: Metrics
    tracer: trace.Tracer
    limiter: Limiter

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    def track(self, request: Request, name: str) -> RequestTracker:
        return RequestTracker(self.metrics, self.tracer, request.headers, name)

    def admit(self, request: Request, name: str) -> tuple[RequestTracker, Permit]:
        """Starts tracking a generation request and takes its permit (TGI does so before validating)."""
        tracker = self.track(request, name)
        try:
            return tracker, self.limiter.acquire()
        except RouterError as e:
            tracker.fail(e.error_type)
            raise


def sse_event(payload: object) -> bytes:
    # TGI (axum json_data) writes `data:` with no space and "\n\n"; we match it byte for byte.
    body = payload if isinstance(payload, bytes) else _encoder.encode(payload)
    return b"data:" + body + b"\n\n"


def sse_response(
    events: AsyncIterator[bytes],
    cleanup: Callable[[], object],
    headers: dict[str, str],
    source: AsyncIterator | None = None,
) -> Stream:
    """Litestar's Stream listens for http.disconnect and cancels the iteration, which closes the
    engine stream; `cleanup` also runs as a background task in case iteration never started."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for e in events:
                yield e
        finally:
            cleanup()

    async def after() -> None:
        cleanup()
        await events.aclose()  # type: ignore[attr-defined]
        if source is not None:  # a primed engine stream the events generator may never have started
            await source.aclose()  # type: ignore[attr-defined]

    return Stream(
        body(),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no", **headers},
        background=BackgroundTask(after),
    )
