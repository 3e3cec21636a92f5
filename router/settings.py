"""RouterSettings: every knob of the HTTP router, and how the CLI/env fill it.

Owns: the frozen settings dataclass and its argparse front end (TGI launcher flag names, each one
also read from its UPPER_SNAKE environment variable). Must not: read the environment anywhere else,
or know anything about the engine beyond the socket path it connects to.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class RouterSettings:
    socket_path: str = "/tmp/tgx-engine.sock"
    hostname: str = "0.0.0.0"
    port: int = 3000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    max_n: int = 16  # OpenAI `n` cap: each choice is a separate engine request
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()
    payload_limit: int = 2_000_000
    otlp_endpoint: str | None = None
    otlp_service_name: str = "tgx.router"
    json_output: bool = False
    compute_type: str = "gpu+optimized"  # echoed in x-compute-type, as TGI's COMPUTE_TYPE env
    connect_timeout: float = 600.0  # seconds to wait for the engine socket at start-up

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_requests",
            "max_best_of",
            "max_client_batch_size",
            "max_n",
            "payload_limit",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1")
        if self.max_stop_sequences < 0 or self.max_top_n_tokens < 0:
            raise ValueError("`max_stop_sequences` and `max_top_n_tokens` must be >= 0")


def _env_default(env: Mapping[str, str], flag: str, default: object, kind: type) -> object:
    raw = env.get(flag.upper().replace("-", "_"))
    if raw is None:
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is list:
        return [v for v in raw.replace(",", " ").split() if v]
    return kind(raw)


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> RouterSettings:
    """Builds RouterSettings from argv, falling back to UPPER_SNAKE env vars, then to the defaults."""
    env = os.environ if env is None else env
    base = RouterSettings()
    p = argparse.ArgumentParser(prog="python -m router", description="tgx HTTP router (TGI/OpenAI API)")

    def add(
        flag: str, kind: type, default: object, help_: str, dest: str | None = None, short: str = ""
    ) -> None:
        value = _env_default(env, flag, default, kind)
        names = [f"--{flag}", *([short] if short else [])]
        if kind is bool:
            p.add_argument(*names, action="store_true", default=value, help=help_, dest=dest)
        elif kind is list:
            p.add_argument(*names, action="append", default=None, help=help_, dest=dest)
            p.set_defaults(**{dest or flag.replace("-", "_"): value})
        else:
            p.add_argument(*names, type=kind, default=value, help=help_, dest=dest)

    add("socket", str, base.socket_path, "engine gRPC unix socket", dest="socket_path")
    add("hostname", str, base.hostname, "address to bind")
    add("port", int, base.port, "port to bind", short="-p")
    add("max-concurrent-requests", int, base.max_concurrent_requests, "in-flight requests before 429")
    add("max-best-of", int, base.max_best_of, "largest best_of")
    add("max-stop-sequences", int, base.max_stop_sequences, "most stop sequences per request")
    add("max-top-n-tokens", int, base.max_top_n_tokens, "largest top_n_tokens / top_logprobs")
    add("max-client-batch-size", int, base.max_client_batch_size, "most prompts per /v1/completions call")
    add("api-key", str, base.api_key, "Bearer key required on generation routes")
    add("cors-allow-origin", list, [], "allowed CORS origin (repeatable); none means any")
    add("payload-limit", int, base.payload_limit, "largest request body in bytes")
    add("otlp-endpoint", str, base.otlp_endpoint, "OTLP gRPC endpoint for traces")
    add("otlp-service-name", str, base.otlp_service_name, "service.name of exported traces")
    add("json-output", bool, base.json_output, "log as JSON lines")
    add(
        "compute-type", str, _env_default(env, "compute-type", base.compute_type, str), "x-compute-type value"
    )
    add("connect-timeout", float, base.connect_timeout, "seconds to wait for the engine")
    ns = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(RouterSettings)}
    values = {k: v for k, v in vars(ns).items() if k in fields}
    values["cors_allow_origin"] = tuple(values.get("cors_allow_origin") or ())
    return RouterSettings(**values)
