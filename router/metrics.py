"""Prometheus metrics of one app: TGI's names (for existing Grafana boards) plus tgx's additions.

Owns: a CollectorRegistry created per app (no module-level metrics), TGI's bucket layouts, and the
refresh of engine-side gauges from EngineClient.stats() at scrape time. Must not: time requests
itself (router/observe.py does) or block a scrape on a dead engine.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.api import EngineInfo

log = logging.getLogger(__name__)

# TGI: 35 geometric buckets 0.0001 * 1.5^k, k = 1..35 (0.15 ms .. ~146 s) for every duration.
DURATION_BUCKETS = tuple(0.0001 * 1.5**k for k in range(1, 36))


def _linear(top: int, n: int = 100) -> tuple[float, ...]:
    step = max(top, n) / n
    return tuple(step * (i + 1) for i in range(n))


class Metrics:
    def __init__(self, info: EngineInfo) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)

        # TGI's counters are exposed under their bare names; prometheus_client would append
        # `_total` to a Counter, so they are Gauges that only ever go up.
        def count(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=DURATION_BUCKETS, registry=r)

        self.request_count = count("tgi_request_count", "Requests received")
        self.request_success = count("tgi_request_success", "Requests that finished")
        self.request_failure = count("tgi_request_failure", "Requests that failed", ("err",))
        self.request_duration = seconds("tgi_request_duration", "End-to-end request time")
        self.validation_duration = seconds("tgi_request_validation_duration", "Arrival to queued")
        self.queue_duration = seconds("tgi_request_queue_duration", "Queued to scheduled (estimated)")
        self.inference_duration = seconds("tgi_request_inference_duration", "Scheduled to end (estimated)")
        self.mean_time_per_token = seconds(
            "tgi_request_mean_time_per_token_duration", "Inference time / generated tokens"
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", buckets=_linear(info.max_input_tokens), registry=r
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens",
            buckets=_linear(info.max_total_tokens),
            registry=r,
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "Requested max_new_tokens",
            buckets=_linear(info.max_total_tokens),
            registry=r,
        )
        self.batch_current_size = Gauge("tgi_batch_current_size", "Running requests", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Tokens reserved by the batch", registry=r
        )
        self.batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens", "KV capacity in tokens", registry=r)
        self.batch_max_total_tokens.set(info.max_batch_total_tokens)
        self.queue_size = Gauge("tgi_queue_size", "Waiting requests", registry=r)
        # tgx additions (TGI issue #2887 asks for TTFT / ITL)
        self.time_to_first_token = seconds("tgi_request_time_to_first_token", "Arrival to first token")
        self.inter_token_latency = seconds("tgi_request_inter_token_latency", "Time between streamed tokens")
        self.kv_cache_usage = Gauge("tgx_kv_cache_usage", "Fraction of KV pages in use", registry=r)
        self.compiled_programs = Counter(
            "tgx_compiled_programs", "XLA programs compiled by the engine", registry=r
        )
        self._compiled_seen = 0.0

    def fail(self, err: str) -> None:
        self.request_failure.labels(err=err).inc()

    async def refresh_engine(self, engine: Any) -> None:
        """Pulls engine gauges; an engine without stats() (or a failing one) leaves them as they were."""
        stats_fn = getattr(engine, "stats", None)
        if stats_fn is None:
            return
        try:
            stats = await stats_fn()
        except Exception as e:  # noqa: BLE001  a scrape must not fail when the engine is busy or gone
            log.warning("engine stats unavailable: %s", e)
            return

        def get(name: str) -> float | None:
            v = stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)
            return None if v is None else float(v)

        for name, gauge in (
            ("num_running", self.batch_current_size),
            ("num_waiting", self.queue_size),
            ("kv_cache_usage", self.kv_cache_usage),
            ("current_max_tokens", self.batch_current_max_tokens),
        ):
            if (v := get(name)) is not None:
                gauge.set(v)
        if (compiled := get("num_compiled_programs")) is not None and compiled > self._compiled_seen:
            self.compiled_programs.inc(compiled - self._compiled_seen)
            self._compiled_seen = compiled

    def render(self) -> bytes:
        return generate_latest(self.registry)
