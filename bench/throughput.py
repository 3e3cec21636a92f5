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

from engine.cli import ProgressLine, add_engine_flags, engine_config  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.loader import random_model  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(parser)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    if args.max_total_tokens is None:
        args.max_total_tokens = args.input_len + args.output_len

    t0 = time.perf_counter()
    cfg = engine_config(args)
    loaded = random_model(cfg.model_id, dtype=cfg.dtype) if args.random_weights else None
    engine = LLMEngine(cfg, loaded=loaded, progress=ProgressLine())
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    vocab = engine.loaded.config.vocab_size
    special = set(engine.tokenizer.all_special_ids)
    candidates = np.array([t for t in range(vocab) if t not in special])
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.num_prompts):
        engine.add_request(rng.choice(candidates, args.input_len).tolist(), params)

    progress = ProgressLine()
    done, generated, steps = 0, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            generated += len(out.tokens)
            done += out.finished
        steps += 1
        progress(done, args.num_prompts, f"requests done, {generated} tokens generated")
    elapsed = time.perf_counter() - start

    expected = args.num_prompts * args.output_len
    assert generated == expected, f"generated {generated} tokens, expected {expected}"
    total = args.num_prompts * (args.input_len + args.output_len)
    result = {
        "model": engine.info.model_id,
        "dtype": engine.info.model_dtype,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_batch_size": engine.info.max_batch_size,
        "elapsed_s": round(elapsed, 3),
        "steps": steps,
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(generated / elapsed, 1),
        "total_tokens_per_s": round(total / elapsed, 1),
        "startup_s": round(startup, 1),
        "warmup_s": round(engine.warmup_seconds, 1),
        "compiled_programs": engine.runner.num_compiled_programs,
    }
    print(f"{'metric':<24}value")
    for key, value in result.items():
        print(f"{key:<24}{value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
