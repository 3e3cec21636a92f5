"""A real `tgx serve` (engine process + router process) on localhost, for end-to-end tests.

It serves a tiny random Llama with SmolLM2's tokenizer and chat template, so start-up is quick; the
real-model numerics are covered by tests/engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import JAX_CACHE, TINY_ENGINE_FLAGS, REPO as ROOT, build_tiny_llama


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class OtlpCollector:
    """A local OTLP/gRPC trace receiver: what the router exports over the wire lands in `spans`."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans: list = []
        self.port = _free_port()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)


@pytest.fixture(scope="session")
def otlp_collector():
    collector = OtlpCollector()
    yield collector
    collector.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir, tmp_path_factory, otlp_collector):
    """Yields the base URL of a running `tgx serve` exporting traces to otlp_collector."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable, "-m", "engine.cli", "serve",
        "--model-id", str(tiny_model_dir),
        *TINY_ENGINE_FLAGS,  # batch 16, 256 tokens, prefill 128, top-n 3
        "--hostname", "127.0.0.1",
        "--port", str(port),
        "--max-concurrent-requests", "256",
        "--otlp-endpoint", f"http://127.0.0.1:{otlp_collector.port}",
        "--compilation-cache-dir", str(JAX_CACHE),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tgx serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tgx serve did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def metric(url: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample from /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)
