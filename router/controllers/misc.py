"""Service routes: GET /info, /health (and GET /, /ping), /metrics and /v1/models.

Owns: TGI's shapes for these and their open access (no api key). Must not: generate text.
"""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.di import NamedDependency

from router.errors import UnhealthyError
from router.services import Services

VERSION = "0.1.0"


async def health_response(svc: Services) -> Response:
    health = getattr(svc.engine, "health", None)
    ok = True
    if health is not None:
        try:
            ok = bool(await health())
        except Exception:  # noqa: BLE001  an engine that cannot answer is unhealthy, not a 500
            ok = False
    if not ok:
        raise UnhealthyError()
    return Response(content=b"", status_code=200, media_type="text/plain")


class MiscController(Controller):
    tags = ("Service",)

    @get("/info", operation_id="get_model_info")
    async def info(self, svc: NamedDependency[Services]) -> dict:
        """Model and router information."""
        i, s = svc.info, svc.settings
        return {
            "model_id": i.model_id,
            "model_sha": None,
            "model_pipeline_tag": None,
            "model_dtype": i.model_dtype,
            "max_concurrent_requests": s.max_concurrent_requests,
            "max_best_of": s.max_best_of,
            "max_stop_sequences": s.max_stop_sequences,
            "max_input_tokens": i.max_input_tokens,
            "max_total_tokens": i.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": s.max_client_batch_size,
            "router": "text-generation-router",
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }

    @get(["/health", "/ping"])  # two paths: operation ids must be unique, so Litestar names them
    async def health(self, svc: NamedDependency[Services]) -> Response:
        """200 with an empty body when the engine answers, else 503."""
        return await health_response(svc)

    @get("/metrics", operation_id="metrics")
    async def metrics(self, svc: NamedDependency[Services]) -> Response:
        """Prometheus metrics."""
        await svc.metrics.refresh_engine(svc.engine)
        return Response(content=svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @get("/v1/models", operation_id="openai_get_model_info")
    async def models(self, svc: NamedDependency[Services]) -> dict:
        """The served model, OpenAI style."""
        mid = svc.info.model_id
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": 0, "owned_by": mid}]}
