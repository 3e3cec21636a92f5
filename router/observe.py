"""Per-request bookkeeping: the concurrency permit, timings, metrics and the request's trace.

Owns: Limiter (TGI's try-acquire semaphore: no queueing, 429 at once) and RequestTracker, which
timestamps validation, first token and every later token of one HTTP request, and at the end
records TGI's metrics, the timing headers and the spans validation/queue/prefill/decode.
The engine reports no queue or prefill timestamps, so the split of time-to-first-token into queue
and prefill is an estimate: prefill is taken to last one mean inter-token interval.
Must not: talk to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping

from opentelemetry import trace

from engine.api import RequestOutput
from router.errors import OverloadedError, RouterError
from router.metrics import Metrics
from router.tracing import parent_context


class Permit:
    def __init__(self, limiter: Limiter) -> None:
        self._limiter: Limiter | None = limiter

    def release(self) -> None:
        """Idempotent: streams release from both their generator and the response's background task."""
        if self._limiter is not None:
            self._limiter.free += 1
            self._limiter = None


@contextlib.contextmanager
def holding(tracker: RequestTracker, permit: Permit, *, keep_on_success: bool = False) -> Iterator[None]:
    """Around a request's engine work: records how it failed and frees the permit. keep_on_success:
    a stream that started hands its permit to the response, which frees it when the stream ends."""
    ok = False
    try:
        yield
        ok = True
    except RouterError as e:
        tracker.fail(e.error_type, e.message)
        raise
    except asyncio.CancelledError:
        tracker.fail("dropped")
        raise
    finally:
        if not (ok and keep_on_success):
            permit.release()


class Limiter:
    def __init__(self, capacity: int) -> None:
        self.free = capacity

    def acquire(self) -> Permit:
        if self.free <= 0:
            raise OverloadedError()
        self.free -= 1
        return Permit(self)


class RequestTracker:
    def __init__(self, metrics: Metrics, tracer: trace.Tracer, headers: Mapping[str, str], name: str) -> None:
        self.metrics, self.tracer = metrics, tracer
        self.t0 = time.perf_counter()
        self.wall0 = time.time_ns()
        self.t_valid: float | None = None
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.t_end: float | None = None
        self.num_tokens = 0
        self.num_prompt_tokens = 0
        self._itl_sum, self._itl_n = 0.0, 0
        self.done = False
        metrics.request_count.inc()
        self.span = tracer.start_span(name, context=parent_context(headers), start_time=self.wall0)

    def _ns(self, t: float) -> int:
        return self.wall0 + int((t - self.t0) * 1e9)

    def validated(self, num_input: int, max_new_tokens: int) -> None:
        self.t_valid = time.perf_counter()
        self.num_prompt_tokens = num_input
        self.metrics.input_length.observe(num_input)
        self.metrics.max_new_tokens.observe(max_new_tokens)

    async def observe(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        last: float | None = None
        async for out in stream:
            now = time.perf_counter()
            n = len(out.tokens)
            if self.t_first is None:
                self.t_first = now
                self.metrics.time_to_first_token.observe(now - self.t0)
            elif last is not None and n:
                gap = (now - last) / n
                self.metrics.inter_token_latency.observe(gap)
                self._itl_sum += now - last
                self._itl_n += n
            if n:
                last = now
            self.t_last = now
            self.num_tokens += n
            yield out

    def timings(self) -> dict[str, float]:
        """Seconds: validation, queue, inference, total, per_token (TGI's split)."""
        end = self.t_end or time.perf_counter()
        valid = self.t_valid or end
        first = self.t_first or end
        mean_itl = self._itl_sum / self._itl_n if self._itl_n else 0.0
        sched = max(valid, first - mean_itl)
        inference = end - sched
        return {
            "validation": valid - self.t0,
            "queue": sched - valid,
            "inference": inference,
            "total": end - self.t0,
            "per_token": inference / self.num_tokens if self.num_tokens else 0.0,
            "scheduled_at": sched,
        }

    def finish(self) -> dict[str, float]:
        if self.done:
            return self.timings()
        self.done = True
        self.t_end = time.perf_counter()
        t = self.timings()
        m = self.metrics
        m.request_success.inc()
        m.request_duration.observe(t["total"])
        m.validation_duration.observe(t["validation"])
        m.queue_duration.observe(t["queue"])
        m.inference_duration.observe(t["inference"])
        m.mean_time_per_token.observe(t["per_token"])
        m.generated_tokens.observe(self.num_tokens)
        self._end_spans(t, None)
        return t

    def fail(self, err: str, message: str = "") -> None:
        if self.done:
            return
        self.done = True
        self.t_end = time.perf_counter()
        self.metrics.fail(err)
        self._end_spans(self.timings(), f"{err}: {message}" if message else err)

    def _end_spans(self, t: dict[str, float], error: str | None) -> None:
        ctx = trace.set_span_in_context(self.span)
        end = self.t_end or time.perf_counter()
        valid = self.t_valid
        phases: list[tuple[str, float, float]] = []
        if valid is not None:
            phases.append(("validation", self.t0, valid))
            if self.t_first is not None:
                phases += [("queue", valid, t["scheduled_at"]), ("prefill", t["scheduled_at"], self.t_first)]
                phases.append(("decode", self.t_first, end))
        for name, a, b in phases:
            s = self.tracer.start_span(name, context=ctx, start_time=self._ns(a))
            s.end(end_time=self._ns(b))
        self.span.set_attribute("tgx.prompt_tokens", self.num_prompt_tokens)
        self.span.set_attribute("tgx.generated_tokens", self.num_tokens)
        if error is not None:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end(end_time=self._ns(end))
