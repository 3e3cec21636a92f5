"""OpenTelemetry tracing of one app: a per-app TracerProvider and W3C traceparent extraction.

Owns: building the tracer (OTLP gRPC exporter when --otlp-endpoint is set, or an injected exporter
for tests, else a no-op tracer) and parsing the client's traceparent. Must not: set the global
tracer provider (two apps in one process would fight over it).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from router.settings import RouterSettings

_PROPAGATOR = TraceContextTextMapPropagator()  # stateless parser, safe to share


def make_tracer(
    settings: RouterSettings, exporter: SpanExporter | None = None
) -> tuple[trace.Tracer, TracerProvider | None]:
    if exporter is None and not settings.otlp_endpoint:
        return trace.NoOpTracer(), None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.otlp_service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True))
        )
    else:
        # Injected exporters are for tests: export synchronously so spans are visible at once.
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tgx.router"), provider


def parent_context(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract(carrier={k.lower(): v for k, v in headers.items()})
