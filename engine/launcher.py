"""`tgx serve`: starts the engine server process, waits for it, starts the router, supervises both.

Owns: the router flags (TGI launcher names, each also read from its UPPER_SNAKE environment
variable), the two child command lines, start-up ordering and shutdown. Must not: import jax, grpc
or the router (the children do the work), or outlive a dead child: if either process exits, the other
is stopped and `tgx serve` exits non-zero.

Children:
    python -m engine.rpc.server --socket PATH [engine flags]
    python -m router --socket PATH --hostname H --port P --max-concurrent-requests N
        --max-best-of N --max-stop-sequences N --max-top-n-tokens N --max-client-batch-size N
        --payload-limit N --otlp-service-name S [--otlp-endpoint URL] [--cors-allow-origin O]...
        [--json-output] --connect-timeout S
    (the API key goes to the router as the API_KEY environment variable, never on a command line)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

log = logging.getLogger("tgx.launcher")

ROUTER_CONNECT_TIMEOUT_S = 60  # the engine is already serving when the router starts
# After the engine dies the router stays this long answering /health with 503 (and failing the
# requests that were in flight), so load balancers and probes see "unhealthy", not a closed port.
ENGINE_DEATH_LINGER_S = 10.0
STOP_TIMEOUT_S = 30  # per child, after SIGTERM, before SIGKILL
PROFILE_STOP_TIMEOUT_S = 600  # an engine writing a --profile-dir trace of the whole run needs longer


def _env(name: str, default=None, cast=str):
    raw = os.environ.get(name.upper().replace("-", "_"))
    if raw is None:
        return default
    return cast(raw)


def add_router_flags(parser: argparse.ArgumentParser) -> None:
    def flag(name: str, cast=str, default=None, help: str = "") -> None:
        env = name.upper().replace("-", "_")
        parser.add_argument(
            f"--{name}", type=cast, default=_env(name, default, cast), help=f"{help} [env {env}]"
        )

    flag("hostname", str, "0.0.0.0", "address the HTTP server binds")
    flag("port", int, 3000, "HTTP port")
    flag("max-concurrent-requests", int, 128, "in-flight requests before answering 429")
    flag("max-stop-sequences", int, 4, "most stop sequences per request")
    flag("max-best-of", int, 2, "largest best_of")
    flag("max-client-batch-size", int, 4, "most prompts in one client call")
    flag("api-key", str, None, "Bearer key required on generation routes")
    origins = [o for o in (_env("cors-allow-origin") or "").replace(",", " ").split() if o]
    parser.add_argument(
        "--cors-allow-origin", action="append", default=None,
        help="allowed CORS origin (repeatable) [env CORS_ALLOW_ORIGIN, comma-separated]",
    )  # fmt: skip
    parser.set_defaults(cors_allow_origin_env=origins)
    flag("payload-limit", int, 2_000_000, "largest request body in bytes")
    flag("otlp-endpoint", str, None, "OTLP gRPC endpoint for traces")
    flag("otlp-service-name", str, "tgx.router", "service.name of exported traces")
    parser.add_argument(
        "--engine-socket",
        default=_env("engine-socket"),
        help="engine Unix socket (default: new temp dir) [env ENGINE_SOCKET]",
    )


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    from engine.cli import add_engine_flags

    add_engine_flags(parser)
    add_router_flags(parser)


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    socket_path: str
    engine_cmd: tuple[str, ...]
    router_cmd: tuple[str, ...]
    router_env: Mapping[str, str]  # added to the inherited environment
    temp_dir: str | None = None  # created for the socket; removed at exit
    engine_stop_timeout: float = STOP_TIMEOUT_S
    engine_death_linger: float = ENGINE_DEATH_LINGER_S


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine flags the user gave (or their env/defaults), re-spelled for the server's parser."""
    from engine.cli import add_engine_flags

    probe = argparse.ArgumentParser(add_help=False)
    add_engine_flags(probe)
    argv: list[str] = []
    for action in probe._actions:
        value = getattr(args, action.dest, None)
        name = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [name] if value else []
        elif value is not None:
            argv += [name, str(value)]
    return argv


def plan(args: argparse.Namespace, router_module: str = "router", python: str = sys.executable) -> LaunchPlan:
    temp_dir = None if args.engine_socket else tempfile.mkdtemp(prefix="tgx-")
    socket_path = args.engine_socket or os.path.join(temp_dir, "engine.sock")
    engine_cmd = [python, "-m", "engine.rpc.server", "--socket", socket_path, *_engine_argv(args)]
    router_cmd = [
        python, "-m", router_module,
        "--socket", socket_path,
        "--hostname", args.hostname,
        "--port", str(args.port),
        "--max-concurrent-requests", str(args.max_concurrent_requests),
        "--max-best-of", str(args.max_best_of),
        "--max-stop-sequences", str(args.max_stop_sequences),
        "--max-top-n-tokens", str(args.max_top_n_tokens),
        "--max-client-batch-size", str(args.max_client_batch_size),
        "--payload-limit", str(args.payload_limit),
        "--otlp-service-name", args.otlp_service_name,
        "--connect-timeout", str(ROUTER_CONNECT_TIMEOUT_S),
    ]  # fmt: skip
    if args.otlp_endpoint:
        router_cmd += ["--otlp-endpoint", args.otlp_endpoint]
    for origin in args.cors_allow_origin or args.cors_allow_origin_env:
        router_cmd += ["--cors-allow-origin", origin]
    if args.json_output:
        router_cmd.append("--json-output")
    router_env = {"API_KEY": args.api_key} if args.api_key else {}
    stop_timeout = PROFILE_STOP_TIMEOUT_S if getattr(args, "profile_dir", None) else STOP_TIMEOUT_S
    return LaunchPlan(socket_path, tuple(engine_cmd), tuple(router_cmd), router_env, temp_dir, stop_timeout)


def _how(rc: int) -> str:
    if rc < 0:
        try:
            return f"code {rc} (killed by {signal.Signals(-rc).name})"
        except ValueError:
            pass
    return f"code {rc}"


def _exit_code(rc: int) -> int:
    """A child's status as ours: never 0 for a child that died, 128+N for a signal like a shell."""
    return rc if rc > 0 else (128 - rc if rc < 0 else 1)


def _stop(proc: subprocess.Popen | None, name: str, timeout: float = STOP_TIMEOUT_S) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("%s process did not stop in %d s; killing it", name, timeout)
        proc.kill()
        proc.wait()


def _follower_marker(socket_path: str) -> str:
    return socket_path + ".follower"  # engine.rpc.server.follower_marker; not imported: it pulls in grpc


def _linger(router: subprocess.Popen, seconds: float, poll_s: float, signals: list[int]) -> None:
    """Keeps the router up a while after the engine died, so /health reports 503 before the port closes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and router.poll() is None and not signals:
        time.sleep(poll_s)


def run(p: LaunchPlan, poll_s: float = 0.2) -> int:
    """Starts and supervises both children; returns the exit code for `tgx serve`.

    A multi-host follower's engine (process id > 0) serves no HTTP: it marks itself with a file
    beside the socket instead of binding it, and then only the engine is supervised.
    """
    signals: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: signals.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    engine = router = None
    if os.path.exists(p.socket_path):
        os.unlink(p.socket_path)  # stale, from a killed run: it must not pass for the new engine's
    try:
        engine = subprocess.Popen(
            p.engine_cmd
        )  # stderr inherited: its loading/compiling progress shows as is
        log.info("engine process started (pid %d), loading the model", engine.pid)
        marker = _follower_marker(p.socket_path)
        while not os.path.exists(p.socket_path):  # the server binds its socket once the model is warm
            if signals:
                return 0
            if (rc := engine.poll()) is not None:
                log.error("engine process exited with %s before it was ready", _how(rc))
                return _exit_code(rc)
            if os.path.exists(marker):
                log.info("this host follows process 0's steps; process 0 serves HTTP")
                while (rc := engine.poll()) is None:
                    if signals:
                        return 0
                    time.sleep(poll_s)
                if rc:
                    log.error("engine process exited with %s", _how(rc))
                return _exit_code(rc) if rc else 0
            time.sleep(poll_s)
        router = subprocess.Popen(p.router_cmd, env={**os.environ, **p.router_env})
        log.info("router process started (pid %d)", router.pid)
        while True:
            if signals:  # checked first: Ctrl-C also reaches the children, whose exit is then expected
                log.info("stopping on signal %d", signals[0])
                return 0
            if (rc := engine.poll()) is not None:
                log.error("engine process exited with %s; stopping the router in %g s", _how(rc),
                          p.engine_death_linger)
                _linger(router, p.engine_death_linger, poll_s, signals)
                return _exit_code(rc)
            if (rc := router.poll()) is not None:
                log.error("router process exited with %s; stopping the engine", _how(rc))
                return _exit_code(rc)
            time.sleep(poll_s)
    finally:
        # Router first: it stops taking requests before the engine that serves them goes away.
        _stop(router, "router")
        _stop(engine, "engine", p.engine_stop_timeout)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if p.temp_dir:
            shutil.rmtree(p.temp_dir, ignore_errors=True)


def serve(args: argparse.Namespace, router_module: str = "router") -> int:
    from engine.cli import check_profile_dir, engine_config
    from engine.engine_factory import preflight

    # Bad engine flag values, and a quantized model this machine cannot run, fail here with the
    # engine's own one-line message, before any process starts.
    preflight(engine_config(args))
    if args.profile_dir:
        check_profile_dir(args.profile_dir)
    return run(plan(args, router_module))


def main(argv: Sequence[str] | None = None, router_module: str = "router") -> int:
    """`tgx serve` without the rest of the CLI; `router_module` lets tests stand in a fake router."""
    from engine.cli import _setup_logging

    parser = argparse.ArgumentParser(prog="tgx serve")
    add_serve_flags(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.json_output)
    try:
        return serve(args, router_module)
    except ValueError as e:
        print(f"tgx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
