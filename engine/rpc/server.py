"""The engine server process: one engine (LLMEngine, or the torch fallback's TorchEngine) behind
gRPC (grpc.aio) on a Unix socket.

Owns: the RPCs over the engine's loop thread (engine.engine_loop), per-step publishing (ONE
StepEvent per engine step holding every RequestOutput of that step, plus the step's stats, to each
Events subscriber), and the process entry point `python -m engine.rpc.server --socket PATH [engine flags]`.
Must not: send one message per token per request, or leave requests running once no client listens.
This is the only process of tgx that imports jax.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time

import grpc

from engine.api import RequestOutput
from engine.rpc import codec
from engine.rpc import engine_pb2 as pb
from engine.rpc import engine_pb2_grpc as pb_grpc
from engine.engine_loop import EngineLoop

log = logging.getLogger("tgx.engine.server")

STALL_S = 120.0  # a loop iteration this long means the engine is stuck: Health says so
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class EngineService(pb_grpc.EngineServicer):
    """The RPCs. Lives on the asyncio loop; talks to the engine only through EngineLoop."""

    def __init__(self, engine, profiler=None) -> None:
        from engine.profiling import Profiler

        self.engine = engine
        self.profiler = profiler if profiler is not None else Profiler()
        self._aio = asyncio.get_running_loop()
        self._subscribers: set[asyncio.Queue] = set()
        self._inflight: set[str] = set()
        self.failure: str | None = None
        self.done = asyncio.Event()  # set when the engine loop dies: the process should exit
        self.loop = EngineLoop(
            engine,
            publish=lambda outs, stats: self._aio.call_soon_threadsafe(self._publish, outs, stats),
            on_failure=lambda e: self._aio.call_soon_threadsafe(self._fail, f"engine failed: {e!r}"),
        )
        self.loop.start()

    # ---- asyncio side of publishing -----------------------------------------------------------

    def _publish(self, outputs: list[RequestOutput], stats: codec.StepStats) -> None:
        for o in outputs:
            if o.finished:
                self._inflight.discard(o.request_id)
        event = codec.event_to_pb(outputs, stats)  # encoded once, shared by every subscriber
        for q in self._subscribers:
            q.put_nowait(event)

    def _fail(self, reason: str) -> None:
        self.failure = reason
        for q in self._subscribers:
            q.put_nowait(reason)
        self.done.set()

    def close_streams(self) -> None:
        for q in self._subscribers:
            q.put_nowait(None)

    # ---- RPCs -----------------------------------------------------------------------------------

    async def Info(self, request, context):
        return codec.info_to_pb(self.engine.info)

    async def Health(self, request, context):
        if self.failure is not None:
            return pb.HealthResponse(healthy=False, reason=self.failure)
        if not self.loop.is_alive():
            return pb.HealthResponse(healthy=False, reason="engine loop is not running")
        if (stalled := time.monotonic() - self.loop.last_progress) > STALL_S:
            return pb.HealthResponse(healthy=False, reason=f"engine step running for {stalled:.0f} s")
        return pb.HealthResponse(healthy=True)

    async def Stats(self, request, context):
        return codec.stats_to_pb(self.loop.stats)

    async def Tokenize(self, request, context):
        ids = await asyncio.to_thread(
            lambda: list(
                self.engine.tokenizer(request.text, add_special_tokens=request.add_special_tokens)[
                    "input_ids"
                ]
            )
        )
        return pb.TokenizeResponse(ids=ids)

    async def Submit(self, request, context):
        if self.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.failure)
        if not self._subscribers:  # its outputs would go nowhere and its pages would never be freed
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "open the Events stream before Submit")
        request_id = request.request_id
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        prompt = codec.submit_prompt(request)
        try:
            params = codec.params_from_pb(request.params)
            # Tokenizing a long text off the event loop keeps other RPCs and the Events stream moving.
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(self.engine.validate, prompt, params)
            else:
                ids = self.engine.validate(prompt, params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if request_id in self._inflight:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request id {request_id!r} is already in use"
            )
        self._inflight.add(request_id)
        try:
            await asyncio.wrap_future(self.loop.add(request_id, ids, params))
        except ValueError as e:
            self._inflight.discard(request_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            self._inflight.discard(request_id)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.SubmitResponse(num_prompt_tokens=len(ids))

    async def Cancel(self, request, context):
        try:
            found = await asyncio.wrap_future(self.loop.cancel(request.request_id))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        return pb.CancelResponse(found=bool(found))

    async def Profile(self, request, context):
        from engine.profiling import ProfilerBusyError, check_seconds

        try:
            seconds = check_seconds(request.seconds)
            await asyncio.to_thread(self.profiler.start, "capture")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ProfilerBusyError as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))
        try:
            await asyncio.sleep(seconds)  # the engine loop runs on its own thread meanwhile
        finally:
            # Also when the caller went away: a trace left running would block every later one.
            result = await asyncio.shield(asyncio.to_thread(self.profiler.stop))
        return pb.ProfileResponse(
            trace_dir=result.trace_dir, xplane=result.xplane,
            perfetto_trace=result.perfetto_trace, seconds=result.seconds,
        )  # fmt: skip

    async def Events(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(q)
        try:
            yield codec.event_to_pb([], self.loop.stats)  # tells the client its subscription is live
            while True:
                item = await q.get()
                if item is None:  # shutting down
                    return
                if isinstance(item, str):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, item)
                yield item
        finally:
            self._subscribers.discard(q)
            if not self._subscribers and self._inflight and self.failure is None:
                # The router is gone: nobody will read these requests' tokens, so free their pages.
                log.warning("last Events subscriber left; cancelling %d requests", len(self._inflight))
                for request_id in list(self._inflight):
                    self.loop.cancel(request_id)


async def serve(
    engine, socket_path: str, stop: asyncio.Event | None = None, profile_dir: str | None = None
) -> int:
    """Serves until SIGINT/SIGTERM or `stop` is set (returns 0), or until the engine loop dies (returns 1).

    `engine` is an LLMEngine, or anything with its admission/step/stats methods (tests pass a fake).
    profile_dir: traces the whole serving run (ready to shutdown) into it; Profile captures go there too.
    """
    from engine.profiling import Profiler

    profiler = Profiler(profile_dir)
    if os.path.exists(socket_path):
        os.unlink(socket_path)  # a stale socket from a killed run
    service = EngineService(engine, profiler)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_EngineServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if profile_dir:
        profiler.start("serve")
    log.info("engine ready: serving %s on unix:%s", engine.info.model_id, socket_path)
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(service.done.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for w in waiters:
        w.cancel()
    failed = service.failure is not None
    log.info("engine server stopping%s", f" ({service.failure})" if failed else "")
    service.close_streams()
    await server.stop(grace=1.0)
    await asyncio.to_thread(service.loop.stop)
    if not failed and hasattr(engine, "shutdown"):
        engine.shutdown()  # a multi-host leader lets its followers exit cleanly
    if profiler.active:
        await asyncio.to_thread(profiler.stop)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    return 1 if failed else 0


def follower_marker(socket_path: str) -> str:
    """The file a follower engine creates instead of the socket: `tgx serve` starts no router for it."""
    return socket_path + ".follower"


def _follow(engine, socket_path: str) -> int:
    """A multi-host follower: no RPCs, no router; it runs the leader's steps until told to stop."""
    import jax

    from engine.sharding.config import EXIT_PEER_FAILURE
    from engine.sharding.distributed import PeerFailure

    marker = follower_marker(socket_path)
    with open(marker, "w"):
        pass
    # Blocked in a plan wait or a collective, Python would only see SIGTERM when it returns.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    log.info("engine process %d: following process 0's steps", engine.process.process_id)
    try:
        engine.follow()
    except (PeerFailure, jax.errors.JaxRuntimeError) as e:
        log.critical("%s", e)
        print(f"tgx engine: fatal: {' '.join(str(e).split())[:500]}", file=sys.stderr, flush=True)
        return EXIT_PEER_FAILURE
    finally:
        try:
            os.unlink(marker)
        except FileNotFoundError:
            pass
    return 0


def _exit_process(rc: int, multi_process: bool) -> int:
    """With jax.distributed, a clean stop meets the other processes in shutdown; a failed one leaves
    at once (shutdown would wait for a dead peer)."""
    if multi_process:
        if rc == 0:
            import jax

            jax.distributed.shutdown()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def default_socket_path() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="tgx-"), "engine.sock")


def main(argv: list[str] | None = None) -> int:
    from engine.cli import (
        ProgressLine, _setup_logging, add_engine_flags, check_profile_dir, engine_config, use_compilation_cache,
    )

    parser = argparse.ArgumentParser(prog="python -m engine.rpc.server", description="tgx engine server")
    add_engine_flags(parser)
    parser.add_argument("--socket", default=None, help="Unix socket path (default: a new temp dir)")
    args = parser.parse_args(argv)
    _setup_logging(args.json_output)
    socket_path = args.socket or default_socket_path()
    # Until the asyncio loop takes over signals, SIGTERM ends the (possibly long) load cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    process = None
    try:
        cfg = engine_config(args)
        if args.profile_dir:
            check_profile_dir(args.profile_dir)
        use_compilation_cache(cfg.compilation_cache_dir)
        from engine.engine_factory import create_engine
        from engine.models.loader import ModelLoadError
        from engine.sharding import distributed

        # Before anything touches a device: every host's process joins here.
        process = distributed.initialize(cfg.sharding)

        try:
            engine = create_engine(cfg, progress=ProgressLine(), random_weights=args.random_weights)
        except ModelLoadError as e:
            raise ValueError(str(e)) from None
    except ValueError as e:
        # A user's mistake (bad flag value, missing model): one clear line, no traceback.
        print(f"tgx engine: error: {e}", file=sys.stderr)
        return _exit_process(2, process is not None and process.num_processes > 1)
    except KeyboardInterrupt:
        return 130
    multi_process = process.num_processes > 1
    if not process.is_leader:
        return _exit_process(_follow(engine, socket_path), multi_process)
    rc = asyncio.run(serve(engine, socket_path, profile_dir=args.profile_dir))
    return _exit_process(rc, multi_process)


if __name__ == "__main__":
    sys.exit(main())
