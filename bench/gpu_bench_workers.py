"""The device-side halves of bench/gpu_bench.py, each run in its own child process.

Owns: `engine` (random-weight engine: device copy bandwidth, single stream, offline workloads),
`hf` (transformers' generate_batch on the same random weights, handed to torch through DLPack, no
host copy) and `startup` (one engine start: warmup seconds, programs, persistent-cache hits). Each
writes one JSON file. Must not: print tables (the parent does) or run without a parent: a child
process per part gives every part the whole device (JAX keeps what it allocated until exit).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from engine.cli import ProgressLine, engine_config  # bench/gpu_bench.py put the repo on sys.path
from engine.sampling_params import SamplingParams


def workloads(spec: str) -> list[tuple[int, int]]:
    """ "256x256,1024x128" -> [(256, 256), (1024, 128)] (input x output tokens)."""
    out = []
    for item in spec.split(","):
        i, o = item.lower().split("x")
        out.append((int(i), int(o)))
    return out


def prompts(seed: int, n: int, input_len: int, vocab: int, special: set[int]) -> list[list[int]]:
    """The same random token-id prompts in every process for the same arguments."""
    rng = np.random.default_rng(seed)
    candidates = np.array([t for t in range(vocab) if t not in special])
    return [rng.choice(candidates, input_len).tolist() for _ in range(n)]


def _setup_jax(args) -> None:
    from engine.cli import use_compilation_cache

    use_compilation_cache(args.compilation_cache_dir)


def _engine(args):
    from engine.engine_factory import create_engine

    import dataclasses

    cfg = engine_config(args)
    if args.lone_decode_bucket != "auto":  # A/B of the 1-token bucket on one machine
        cfg = dataclasses.replace(cfg, lone_decode_bucket=args.lone_decode_bucket == "on")
    if args.fuse_projections != "auto":
        cfg = dataclasses.replace(cfg, fuse_projections=args.fuse_projections == "on")
    return create_engine(cfg, progress=ProgressLine(), random_weights=True)


def _program_shape(engine, save_dir: Path | None = None) -> dict:
    """The smallest token bucket's forward program as XLA built it: its top-level op count. (XLA's
    command buffers, CUDA graphs, are formed after this HLO: traces show them as cuGraphLaunch.)
    With save_dir, its optimized HLO is written there, to name the fusions a trace shows."""
    bucket = min(engine.runner.limits.token_buckets)
    text = engine.runner.forward_program(bucket).as_text() or ""
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / f"forward_t{bucket}.hlo.txt").write_text(text)
    entry = text[text.rfind("ENTRY"):]
    return {
        "token_bucket": bucket,
        "entry_ops": sum(1 for line in entry.splitlines() if " = " in line),
    }


def _weight_bytes(loaded) -> tuple[int, int]:
    """(all parameter bytes, bytes one decode step reads): an untied input embedding is gathered
    row by row, not read whole, so it is left out of the second."""
    from engine.models.params import named_params

    sizes = {n: p.get_value().nbytes for n, p in named_params(loaded.model).items()}
    total = sum(sizes.values())
    tied = loaded.config.tie_word_embeddings
    embed = sum(v for n, v in sizes.items() if n.endswith("embed_tokens.weight"))
    return total, total - (0 if tied else embed)


def copy_bandwidth(nbytes: int, reps: int = 5, chain: int = 10) -> dict:
    """Bytes read + written per second by an elementwise pass over a bf16 array of `nbytes`.

    Each timing runs `chain` passes back to back (each donates its input, so two arrays at most are
    live) and divides: a lone pass of ~1.6 ms would count the host's launch and sync as device time,
    and understate the bandwidth by up to 10% (seen: the floor moved 5.5 -> 6.2 ms between runs)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((max(nbytes // 2 // 4096, 1), 4096), jnp.bfloat16)  # [N, 4096]
    # A negation, not x itself: jit returns an unchanged input without any device work.
    f = jax.jit(lambda a: -a, donate_argnums=0)
    x = f(x)
    x.block_until_ready()
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        for _ in range(chain):
            x = f(x)
        x.block_until_ready()
        times.append((time.perf_counter() - t) / chain)
    seconds = statistics.median(times[1:])  # the first is a warm-up
    return {"bytes": int(x.nbytes), "median_s": seconds, "bytes_per_s": 2 * x.nbytes / seconds}


def _drain(engine, on_token=None) -> tuple[int, int]:
    generated = steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            generated += len(o.tokens)
            if on_token is not None:
                on_token(o, now)
    return generated, steps


def single_stream(engine, args, vocab: int, special: set[int]) -> dict:
    """One request at a time: TTFT, and decode ms/token from the 2nd token to the last."""
    warm = prompts(args.seed + 1, 1, args.single_input_len, vocab, special)[0]
    engine.add_request(warm, SamplingParams(max_new_tokens=8, ignore_eos=True))
    _drain(engine)  # first-touch costs (allocator growth, host caches) stay out of the timed runs
    runs = []
    for i, prompt in enumerate(
        prompts(args.seed + 2, args.single_runs, args.single_input_len, vocab, special)
    ):
        times: list[float] = []
        engine.add_request(prompt, SamplingParams(max_new_tokens=args.single_output_len, ignore_eos=True))
        start = time.perf_counter()
        _drain(engine, lambda o, now, times=times: times.extend([now] * len(o.tokens)))
        decode = (times[-1] - times[0]) / max(len(times) - 1, 1)
        runs.append({"ttft_ms": (times[0] - start) * 1e3, "decode_ms_per_token": decode * 1e3})
        print(f"[single stream] run {i + 1}/{args.single_runs}: {decode * 1e3:.2f} ms/token", file=sys.stderr)
    return {
        "input_len": args.single_input_len,
        "output_len": args.single_output_len,
        "runs": runs,
        "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
        "decode_ms_per_token": statistics.median(r["decode_ms_per_token"] for r in runs),
    }


def offline(engine, args, input_len: int, output_len: int, vocab: int, special: set[int]) -> dict:
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    batch = prompts(args.seed, args.num_prompts, input_len, vocab, special)
    first: list[int] = []
    for k, p in enumerate(batch):
        engine.add_request(p, params, request_id=f"w{input_len}x{output_len}-{k}")
    progress, done = ProgressLine(), 0

    def on_token(o, now):
        nonlocal done
        if o.request_id.endswith("-0"):
            first.extend(t.token_id for t in o.tokens)
        done += o.finished
        progress(done, len(batch), f"requests of {input_len} in / {output_len} out done")

    start = time.perf_counter()
    generated, steps = _drain(engine, on_token)
    elapsed = time.perf_counter() - start
    assert generated == len(batch) * output_len, (
        f"generated {generated} tokens, expected {len(batch) * output_len}"
    )
    return {
        "input_len": input_len,
        "output_len": output_len,
        "num_prompts": len(batch),
        "elapsed_s": elapsed,
        "steps": steps,
        "requests_per_s": len(batch) / elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": len(batch) * (input_len + output_len) / elapsed,
        "first_prompt_tokens": first[:32],  # greedy: what the HF run should reproduce
    }


def engine_worker(args) -> dict:
    import jax

    _setup_jax(args)
    t0 = time.perf_counter()
    engine = _engine(args)
    startup = time.perf_counter() - t0
    total, per_step = _weight_bytes(engine.loaded)
    vocab = engine.loaded.config.vocab_size
    special = set(engine.tokenizer.all_special_ids)
    device = jax.devices()[0]
    out = {
        "device": f"{device.platform}: {device.device_kind}",
        "model": engine.info.model_id,
        "dtype": engine.info.model_dtype,
        "max_batch_size": engine.info.max_batch_size,
        "max_batch_prefill_tokens": engine.info.max_batch_prefill_tokens,
        "kv_capacity_tokens": engine.info.max_batch_total_tokens,
        "startup_s": startup,
        "warmup_s": engine.warmup_seconds,
        "compiled_programs": engine.runner.num_compiled_programs,
        "weight_bytes": total,
        "weight_bytes_read_per_step": per_step,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "decode_program": _program_shape(engine, args.trace_out),
    }
    if "single" in args.parts:
        copy_bytes = args.copy_mib << 20 if device.platform != "cpu" else min(args.copy_mib, 256) << 20
        out["copy"] = copy_bandwidth(copy_bytes)
        out["single"] = single_stream(engine, args, vocab, special)
    if "profile" in args.parts:
        from gpu_bench_profile import profile_worker_part

        out["profile"] = profile_worker_part(engine, args, vocab, special)
    if "offline" in args.parts:
        out["offline"] = [offline(engine, args, i, o, vocab, special) for i, o in workloads(args.workloads)]
    return out


def hf_worker(args) -> dict:
    """transformers' generate_batch on the engine's random weights (same seed), first workload."""
    import jax
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from engine.models.loader import random_model
    from engine.models.params import named_params

    _setup_jax(args)
    loaded = random_model(args.model_id, dtype=args.dtype)  # seed 0, as the engine's
    on_gpu = jax.devices()[0].platform == "gpu"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("the weights are on a GPU but torch sees no CUDA device: no HF comparison")
    device = torch.device("cuda" if on_gpu else "cpu")
    # DLPack shares the device buffers: torch uses JAX's copy of the weights, no second one.
    state = {name: torch.from_dlpack(p.get_value()) for name, p in named_params(loaded.model).items()}
    torch_dtype = getattr(torch, loaded.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_id), dtype=torch_dtype)
    model.load_state_dict(state, assign=True, strict=False)
    with torch.device(device):  # its buffers were left on "meta" and are not in the state dict
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    model.tie_weights()
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise SystemExit(f"HF model still has unset tensors: {meta[:5]}")
    model.eval()
    input_len, output_len = workloads(args.workloads)[0]
    special = set(loaded.tokenizer.all_special_ids)
    batch = prompts(args.seed, args.num_prompts, input_len, loaded.config.vocab_size, special)
    batch = batch[: args.hf_num_prompts]
    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    warm = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # No inference_mode here: generate_batch runs its own thread and writes its own tensors in place.
    model.generate_batch(inputs=batch[:2], generation_config=warm)  # kernels, lazy inits
    print(f"[hf] generate_batch: {len(batch)} prompts of {input_len} in / {output_len} out", file=sys.stderr)
    start = time.perf_counter()
    results = model.generate_batch(inputs=batch, generation_config=gen)
    wall = time.perf_counter() - start
    outs = list(results.values())
    generated = sum(len(o.generated_tokens) for o in outs)
    errors = [o.error for o in outs if getattr(o, "error", None)]
    if not outs or len(errors) == len(outs) or generated == 0:
        raise SystemExit(f"HF generate_batch produced nothing: {(errors or ['no outputs'])[0]}")
    failed = len(errors) + len(batch) - len(outs)
    # From the first request's creation to the last finish: leaves out generate_batch's set-up
    # (cache allocation, CUDA graph warm-up), as the engine's figure leaves out its start-up.
    try:
        elapsed = max(o.lifespan[1] for o in outs) - min(o.created_time for o in outs)
    except (AttributeError, TypeError, ValueError):
        elapsed = wall
    first = next((o for o in outs if list(o.prompt_ids) == batch[0]), outs[0])
    return {
        "transformers": transformers.__version__,
        "attn_implementation": model.config._attn_implementation,
        "input_len": input_len,
        "output_len": output_len,
        "num_prompts": len(batch),
        "failed": failed,
        "wall_s": wall,
        "elapsed_s": elapsed,
        "requests_per_s": len(outs) / elapsed,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + len(outs) * input_len) / elapsed,
        "first_prompt_tokens": list(first.generated_tokens)[:32],
    }


def startup_worker(args) -> dict:
    import jax

    counts = {"hits": 0, "misses": 0}

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":
            counts["misses"] += 1

    jax.monitoring.register_event_listener(on_event)
    _setup_jax(args)
    t0 = time.perf_counter()
    engine = _engine(args)
    return {
        "engine_start_s": time.perf_counter() - t0,
        "warmup_s": engine.warmup_seconds,
        "compiled_programs": engine.runner.num_compiled_programs,
        "breakdown": engine.runner.warmup_breakdown,
        "cache_hits": counts["hits"],
        "cache_misses": counts["misses"],
    }


WORKERS = {"engine": engine_worker, "hf": hf_worker, "startup": startup_worker}


def run_worker(args) -> None:
    result = WORKERS[args.worker](args)
    Path(args.worker_out).write_text(json.dumps(result, indent=2) + "\n")
