"""Offline throughput: N prompts of fixed input and output length, EOS ignored, through the engine.

Owns: one whole measurement in one process (load, warm up, run, report). Prints output and total
tokens/s (and writes them as JSON with --json-out). Must not: be imported by the engine.

    python bench/throughput.py --num-prompts 64 --input-len 128 --output-len 128
    python bench/throughput.py --model-id bench/configs/smollm2-135m --random-weights ...  # no download
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.cli import ProgressLine, add_engine_flags, engine_config, use_compilation_cache  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def _workloads(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """[(prompts, input_len, output_len)]: --workloads "1x128x256,512x256x256", else the single flags."""
    if not args.workloads:
        return [(args.num_prompts, args.input_len, args.output_len)]
    try:
        return [tuple(int(v) for v in w.split("x")) for w in args.workloads.split(",")]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(f"--workloads wants PROMPTSxINxOUT[,...], got {args.workloads!r}") from None


def run_workload(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.loaded.config.vocab_size
    special = set(engine.tokenizer.all_special_ids)
    candidates = np.array([t for t in range(vocab) if t not in special])
    params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
    for _ in range(num_prompts):
        engine.add_request(rng.choice(candidates, input_len).tolist(), params)

    progress = ProgressLine()
    done, generated, steps = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.tokens)
            done += out.finished
        steps += 1
        progress(done, num_prompts, f"requests done, {generated} tokens generated")
    elapsed = time.perf_counter() - start

    expected = num_prompts * output_len
    assert generated == expected, f"generated {generated} tokens, expected {expected}"
    total = num_prompts * (input_len + output_len)
    return {
        "num_prompts": num_prompts,
        "input_len": input_len,
        "output_len": output_len,
        "elapsed_s": round(elapsed, 3),
        "steps": steps,
        "ms_per_step": round(1000 * elapsed / max(steps, 1), 2),
        "requests_per_s": round(num_prompts / elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round(total / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--workloads", default=None,
                        help="several workloads on one warm engine: PROMPTSxINxOUT[,...] (overrides the three above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    workloads = _workloads(args)
    if args.max_total_tokens is None:
        args.max_total_tokens = max(i + o for _, i, o in workloads)

    t0 = time.perf_counter()
    cfg = engine_config(args)
    use_compilation_cache(cfg.compilation_cache_dir)
    engine = LLMEngine(cfg, random_weights=args.random_weights, progress=ProgressLine())
    startup = time.perf_counter() - t0
    mesh = engine.mesh
    result = {
        "model": engine.info.model_id,
        "dtype": engine.info.model_dtype,
        "mesh": "1 device" if mesh is None else f"data={mesh.shape['data']} x model={mesh.shape['model']}",
        "max_batch_size": engine.info.max_batch_size,
        "startup_s": round(startup, 1),
        "warmup_s": round(engine.warmup_seconds, 1),
        "compiled_programs": engine.runner.num_compiled_programs,
        "workloads": [run_workload(engine, *w, seed=args.seed) for w in workloads],
    }
    print(f"{'metric':<24}value")
    for key, value in result.items():
        if key != "workloads":
            print(f"{key:<24}{value}")
    for w in result["workloads"]:
        print(f"workload {w['num_prompts']} x {w['input_len']} in / {w['output_len']} out")
        for key, value in w.items():
            print(f"  {key:<22}{value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
