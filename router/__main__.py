"""`python -m router`: connect to the engine over its socket, then serve the HTTP API with uvicorn.

Owns: process start-up only (logging, engine connection, tokenizer load). Must not: contain
request logic. Example:
    python -m router --socket /tmp/tgx-engine.sock --hostname 0.0.0.0 --port 3000 \
        --max-concurrent-requests 128 --api-key KEY --cors-allow-origin https://a.example
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import uvicorn

from router.app import create_app
from router.settings import RouterSettings, parse_args
from router.tokenizer import RouterTokenizer


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname, "target": record.name, "message": record.getMessage()})


def _setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])


async def serve(settings: RouterSettings) -> None:
    from engine.rpc.client import RemoteEngine  # the engine's gRPC client (no jax in this process)

    engine = await RemoteEngine.connect(settings.socket_path, settings.connect_timeout)
    tokenizer = await asyncio.to_thread(RouterTokenizer.from_dir, engine.info.tokenizer_dir)
    app = create_app(settings, engine, tokenizer)
    # Keep-alive well past clients' own expiry (httpx: 5 s, uvicorn's default too): with equal
    # timeouts a client can reuse a connection in the instant the server closes it, and the request
    # dies with a read error (4 of 1,024 at concurrency 256 in bench/RESULTS.md).
    config = uvicorn.Config(
        app, host=settings.hostname, port=settings.port, log_config=None, timeout_graceful_shutdown=90,
        timeout_keep_alive=75, backlog=4096,
    )
    await uvicorn.Server(config).serve()


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    _setup_logging(settings.json_output)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
