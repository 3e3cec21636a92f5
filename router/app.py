"""create_app: assembles the Litestar app around an engine client and a tokenizer.

Owns: routing, dependency injection of Services, exception handlers, CORS, the payload limit,
OpenAPI, and the lifespan that closes the engine client and flushes traces. Must not: connect to
the engine (router/__main__.py does, so tests can pass a fake engine).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from opentelemetry.sdk.trace.export import SpanExporter

from engine.api import EngineClient
from router.controllers.admin import AdminController
from router.controllers.misc import VERSION, MiscController
from router.controllers.openai import OpenAIController
from router.controllers.tgi import TGIController
from router.errors import EXCEPTION_HANDLERS
from router.metrics import Metrics
from router.observe import Limiter
from router.services import Services
from router.settings import RouterSettings
from router.tokenizer import RouterTokenizer
from router.tracing import make_tracer

log = logging.getLogger(__name__)


def _services(state: State) -> Services:
    return state.services


def create_app(
    settings: RouterSettings,
    engine_client: EngineClient,
    tokenizer: RouterTokenizer | object,
    span_exporter: SpanExporter | None = None,
) -> Litestar:
    """`tokenizer` may be a RouterTokenizer or a Hugging Face tokenizer; `span_exporter` is for tests."""
    tok = tokenizer if isinstance(tokenizer, RouterTokenizer) else RouterTokenizer(tokenizer)
    tracer, provider = make_tracer(settings, span_exporter)
    services = Services(
        settings=settings,
        engine=engine_client,
        tokenizer=tok,
        metrics=Metrics(engine_client.info),
        tracer=tracer,
        limiter=Limiter(settings.max_concurrent_requests),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        try:
            yield
        finally:
            close = getattr(engine_client, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            if provider is not None:
                provider.shutdown()

    cors = CORSConfig(
        allow_origins=list(settings.cors_allow_origin) or ["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["content-type", "authorization"],
    )
    return Litestar(
        route_handlers=[TGIController, OpenAIController, MiscController, AdminController],
        dependencies={"svc": Provide(_services, sync_to_thread=False)},
        state=State({"services": services}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        cors_config=cors,
        request_max_body_size=settings.payload_limit,
        lifespan=[lifespan],
        # TGI serves its schema at /api-doc/openapi.json; keep the same URL.
        openapi_config=OpenAPIConfig(title="tgx", version=VERSION, path="/api-doc"),
        debug=False,
    )
