"""Router errors and the exception handlers that turn them (and Litestar's own) into JSON.

Owns: the error classes handlers raise, their HTTP status / TGI `error_type`, and the two wire
shapes: TGI's {"error", "error_type"} and OpenAI's {"error": {message, type, param, code}} on the
/v1/chat/completions and /v1/completions routes. Must not: let any client mistake reach the
client as a 500 (malformed JSON, wrong types, bad UTF-8 are all 4xx here).
"""

from __future__ import annotations

import logging

from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

log = logging.getLogger(__name__)

OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions")
# OpenAI answers invalid parameters with 400 invalid_request_error; TGI routes keep TGI's 422.
OPENAI_VALIDATION_STATUS = 400


class RouterError(Exception):
    status_code = 500
    error_type = "internal"
    prefix = ""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def text(self) -> str:
        return f"{self.prefix}{self.message}"


class InputValidationError(RouterError):
    status_code, error_type, prefix = 422, "validation", "Input validation error: "


class TemplateError(RouterError):
    status_code, error_type, prefix = 422, "template_error", "Template error: "


class BadBatchError(RouterError):
    """A /v1/completions request TGI rejects with its own error_type (suffix, batch size)."""

    status_code = 422

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class OverloadedError(RouterError):
    status_code, error_type = 429, "overloaded"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationError(RouterError):
    status_code, error_type, prefix = 424, "generation", "Request failed during generation: "


class UnhealthyError(RouterError):
    status_code, error_type = 503, "healthcheck"

    def __init__(self) -> None:
        super().__init__("unhealthy")


def _is_openai(request: Request) -> bool:
    return request.url.path.rstrip("/") in OPENAI_PATHS


def error_response(
    request: Request, status: int, message: str, error_type: str, param: str | None = None
) -> Response:
    if _is_openai(request):
        if status == 422 and error_type == "validation":
            status = OPENAI_VALIDATION_STATUS
        oa_type = {
            401: "authentication_error",
            429: "rate_limit_error",
            503: "server_error",
            424: "server_error",
        }
        body = {
            "error": {
                "message": message,
                "type": oa_type.get(status, "invalid_request_error" if status < 500 else "server_error"),
                "param": param,
                "code": error_type,
            }
        }
    else:
        body = {"error": message, "error_type": error_type}
    return Response(content=body, status_code=status, media_type="application/json")


def handle_router_error(request: Request, exc: RouterError) -> Response:
    return error_response(request, exc.status_code, exc.text, exc.error_type, exc.param)


def _validation_text(exc: ValidationException) -> tuple[str, str | None]:
    """msgspec's message already names the field path ("Expected `int`, got `str` - at `$.parameters.top_k`")."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    parts, param = [], None
    for item in extra:
        if isinstance(item, dict):
            parts.append(f"{item.get('message')}" + (f" - at `{item['key']}`" if item.get("key") else ""))
            param = param or item.get("key")
    detail = "; ".join(parts) or exc.detail
    return f"Failed to deserialize the JSON body into the target type: {detail}", param


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        return error_response(request, 413, "Payload too large", "payload_too_large")
    if isinstance(exc, ValidationException):
        message, param = _validation_text(exc)
        return error_response(request, 422, message, "validation", param)
    if isinstance(exc, NotFoundException):
        return error_response(request, 404, exc.detail or "Not Found", "not_found")
    status = exc.status_code
    if status >= 500:
        log.error("http exception %s: %s", status, exc.detail)
    # Litestar wraps body decode failures (bad JSON, bad UTF-8) in a plain 400 ClientException.
    error_type = "validation" if status == 400 else "http_error"
    detail = exc.detail or "Bad request"
    if status == 400 and detail.startswith("JSON is malformed"):
        detail = f"Failed to parse the request body as JSON: {detail}"
    return error_response(request, status, detail, error_type)


def handle_serialization(request: Request, exc: SerializationException) -> Response:
    return error_response(request, 400, f"Failed to parse the request body as JSON: {exc}", "validation")


def handle_unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, UnicodeDecodeError):
        return error_response(request, 400, f"Request body is not valid UTF-8: {exc}", "validation")
    log.exception("unhandled error on %s", request.url.path)
    return error_response(request, 500, f"Internal error: {type(exc).__name__}", "internal")


EXCEPTION_HANDLERS = {
    RouterError: handle_router_error,
    HTTPException: handle_http_exception,
    SerializationException: handle_serialization,
    Exception: handle_unexpected,
}
