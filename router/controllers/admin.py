"""Admin routes: POST /admin/profile, a JAX profiler capture of the running engine process.

Owns: reading and checking `seconds` (query or JSON body, 1..120, default 10), the 409 while another
trace runs, and the answer: where the trace was written and how to open it. Must not: profile
anything itself (the engine process does, through EngineClient.profile), or answer without the API
key when one is set (a capture slows serving).
"""

from __future__ import annotations

import math

import msgspec
from litestar import Controller, Request, post
from litestar.di import NamedDependency

from engine.api import ProfilerBusyError
from router.auth import require_api_key
from router.errors import InputValidationError, RouterError, UnhealthyError
from router.services import Services

MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 1, 120, 10  # the engine checks the same range


class ProfilerBusy(RouterError):
    status_code, error_type = 409, "profiler_busy"


class ProfilingUnsupported(RouterError):
    status_code, error_type = 501, "not_implemented"


def _seconds(request: Request, body: bytes) -> float:
    raw: object = request.query_params.get("seconds")
    if raw is None and body.strip():
        try:
            data = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise InputValidationError('the body must be JSON like {"seconds": 10}', "seconds") from None
        if not isinstance(data, dict):
            raise InputValidationError('the body must be a JSON object like {"seconds": 10}', "seconds")
        raw = data.get("seconds")
    if raw is None:
        return float(DEFAULT_SECONDS)
    not_a_number = InputValidationError(f"`seconds` must be a number. Given: {raw!r}", "seconds")
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise not_a_number
    try:
        seconds = float(raw)
    except ValueError:
        raise not_a_number from None
    if not (math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
        raise InputValidationError(
            f"`seconds` must be >= {MIN_SECONDS} and <= {MAX_SECONDS}. Given: {raw}", "seconds"
        )
    return seconds


class AdminController(Controller):
    path = "/admin"
    tags = ("Admin",)
    before_request = require_api_key

    # Out of the OpenAPI schema: an operator's tool, not part of the API clients (or fuzzers) use.
    @post("/profile", operation_id="admin_profile", status_code=200, include_in_schema=False)
    async def profile(self, request: Request, svc: NamedDependency[Services]) -> dict:
        """Traces the engine process for `seconds` (1..120, default 10; query or JSON body) with the
        JAX profiler and answers once the trace is written: 409 while another trace is running."""
        seconds = _seconds(request, await request.body())
        capture = getattr(svc.engine, "profile", None)
        if capture is None:
            raise ProfilingUnsupported("this engine client cannot capture profiles")
        try:
            result = await capture(seconds)
        except ProfilerBusyError as e:
            raise ProfilerBusy(str(e)) from None
        except ValueError as e:
            raise InputValidationError(str(e), "seconds") from None
        except RuntimeError:  # EngineUnavailableError and kin: the engine is gone
            raise UnhealthyError() from None
        return {
            "trace_dir": result.trace_dir,
            "xplane": result.xplane,
            "perfetto_trace": result.perfetto_trace,
            "seconds": result.seconds,
            "open_with": {
                "xprof": f"xprof --port 8791 {result.trace_dir}",
                "tensorboard": f"tensorboard --logdir {result.trace_dir}  (with the xprof plugin installed)",
                "perfetto": f"load {result.perfetto_trace or '<trace_dir>/plugins/profile/*/perfetto_trace.json.gz'}"
                " at https://ui.perfetto.dev",
            },
        }
