"""The `tgx` command: argument parsing and terminal output.

Owns: the flags (TGI launcher names, each also read from its UPPER_SNAKE environment variable),
building the frozen EngineConfig once, logging set-up and progress display. Must not: hold engine
logic; it calls the public APIs like any user would.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from engine.config import EngineConfig
from engine.sharding.config import ShardingConfig

log = logging.getLogger("tgx")


def _env(name: str, default=None, cast=str):
    raw = os.environ.get(name.upper().replace("-", "_"))
    if raw is None:
        return default
    if cast is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    return cast(raw)


def _flag(parser: argparse.ArgumentParser, name: str, cast=str, default=None, help: str = "") -> None:
    env = name.upper().replace("-", "_")
    if cast is bool:
        parser.add_argument(f"--{name}", action="store_true", default=_env(name, default or False, bool), help=f"{help} [env {env}]")
    else:
        parser.add_argument(f"--{name}", type=cast, default=_env(name, default, cast), help=f"{help} [env {env}]")


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "model-id", help="Hub id (from the local HF cache), local directory or .gguf file; default: embedded SmolLM2-135M-Instruct")
    _flag(parser, "revision", help="Hub revision")
    _flag(parser, "dtype", default="bfloat16", help="bfloat16 or float32")
    _flag(parser, "max-batch-size", int, 32, "most requests in one step")
    _flag(parser, "max-batch-prefill-tokens", int, None, "prompt tokens per step (default 4096 on accelerators, 512 on CPU)")
    _flag(parser, "max-batch-total-tokens", int, None, "KV cache capacity in tokens (default: from memory)")
    _flag(parser, "max-input-tokens", int, None, "longest prompt (default max-total-tokens - 1)")
    _flag(parser, "max-total-tokens", int, None, "prompt + generated cap per request (default min(model max, 4096))")
    _flag(parser, "page-size", int, 16, "KV cache page size in tokens")
    _flag(parser, "memory-fraction", float, 0.9, "fraction of device memory to use")
    _flag(parser, "max-top-n-tokens", int, 5, "most top-n alternatives a request may ask for")
    _flag(parser, "compilation-cache-dir", help="persistent XLA compilation cache directory")
    _flag(parser, "attention-backend", str, "auto",
          "ragged paged attention: auto (Pallas kernel on NVIDIA GPUs, pure-JAX reference elsewhere), reference, pallas")
    _flag(parser, "disable-chunked-prefill", bool, False, "prefill each prompt in one step")
    _flag(parser, "disable-prefill-logprobs", bool, False, "don't compile the prompt-logprobs programs")
    _flag(parser, "disable-async-scheduling", bool, False, "wait for each step's tokens before preparing the next step")
    _flag(parser, "num-shard", int, None, "devices that split one model copy (tensor parallel; default: all accelerators / data-parallel-size, 1 on CPU)")
    _flag(parser, "data-parallel-size", int, 1, "model replicas, each serving its own batch")
    _flag(parser, "coordinator-address", help="multi-host: host:port of process 0 (default: detected on Cloud TPU VMs, Slurm, Open MPI)")
    _flag(parser, "num-processes", int, None, "multi-host: number of processes (hosts)")
    _flag(parser, "process-id", int, None, "multi-host: this process's index; process 0 schedules and serves HTTP")
    _flag(parser, "distributed-heartbeat-timeout", int, 10, "multi-host: seconds without heartbeats before a host counts as dead")
    _flag(parser, "step-timeout", float, 120.0, "multi-host: seconds a step may take before a host counts as hung")
    _flag(parser, "profile-dir", help="JAX profiler trace of the whole run (serve: ready to shutdown) into this directory; POST /admin/profile captures land here too")
    _flag(parser, "random-weights", bool, False, "BENCHMARKING ONLY: --model-id is a config directory (config.json + tokenizer) and the weights are random, made on the device; outputs are meaningless")
    _flag(parser, "json-output", bool, False, "log as JSON lines")


def check_profile_dir(path: str) -> str:
    """Creates --profile-dir if needed; ValueError (one line for the user) if it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--profile-dir {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--profile-dir {path}: not writable")
    return path


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model_id=args.model_id,
        revision=args.revision,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        page_size=args.page_size,
        memory_fraction=args.memory_fraction,
        max_top_n_tokens=args.max_top_n_tokens,
        enable_chunked_prefill=not args.disable_chunked_prefill,
        enable_prefill_logprobs=not args.disable_prefill_logprobs,
        async_scheduling=not args.disable_async_scheduling,
        compilation_cache_dir=args.compilation_cache_dir,
        attention_backend=args.attention_backend,
        sharding=sharding_config(args),
    )


def sharding_config(args: argparse.Namespace) -> ShardingConfig:
    return ShardingConfig(
        tensor_parallel=args.num_shard,
        data_parallel=args.data_parallel_size,
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        heartbeat_timeout_s=args.distributed_heartbeat_timeout,
        step_timeout_s=args.step_timeout,
    )


class ProgressLine:
    """A one-line progress display on stderr for loading and compiling."""

    def __init__(self) -> None:
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.monotonic()
        if done < total and now - self._last < (0.1 if self._tty else 2.0):
            return
        self._last = now
        line = f"[{done}/{total}] {what}"
        if self._tty:
            sys.stderr.write("\r\033[K" + line[:120] + ("\n" if done >= total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _setup_logging(json_output: bool) -> None:
    fmt = (
        '{"time":"%(asctime)s","level":"%(levelname)s","target":"%(name)s","message":"%(message)s"}'
        if json_output
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr)


def use_compilation_cache(path: str | None) -> None:
    """Points jax's persistent compilation cache at `path` (None: leave it off), for every program.

    jax skips programs that compile in under a second by default; a server restart would then still
    compile the dozens of small sampler programs, so the minimum goes to 0 (and the size floor off).
    """
    if not path:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _generate(args: argparse.Namespace) -> int:
    from engine.engine_factory import create_engine
    from engine.sampling_params import SamplingParams

    cfg = engine_config(args)
    use_compilation_cache(cfg.compilation_cache_dir)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    if args.profile_dir:
        check_profile_dir(args.profile_dir)
    engine = create_engine(cfg, progress=ProgressLine(), random_weights=args.random_weights)
    profiler = None
    if args.profile_dir:
        from engine.profiling import Profiler

        profiler = Profiler(args.profile_dir)
        profiler.start("generate")
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": prompt})
        text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS
    engine.add_request(prompt, params)
    start, n = time.perf_counter(), 0
    while engine.has_unfinished():
        for out in engine.step():
            n += len(out.tokens)
            sys.stdout.write(out.text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    if profiler is not None:
        profiler.stop()
    log.info("%d tokens in %.2f s (%.1f tokens/s)", n, elapsed, n / max(elapsed, 1e-9))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgx", description="JAX/XLA text-generation inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    add_engine_flags(gen)
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message for --chat")
    gen.set_defaults(max_batch_size=_env("max-batch-size", 1, int))
    from engine.launcher import add_serve_flags

    srv = sub.add_parser("serve", help="serve the HTTP API: an engine process and a router process")
    add_serve_flags(srv)
    args = parser.parse_args(argv)
    _setup_logging(args.json_output)
    from engine.models.loader import ModelLoadError

    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from engine.launcher import serve

            return serve(args)
    except (ValueError, ModelLoadError) as e:
        # A user's mistake (bad flag value, missing model): one clear line, no traceback.
        print(f"tgx: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
