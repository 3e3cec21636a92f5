"""Tensor-parallel scaling: the same workloads at each --num-shard, one engine process per degree.

Owns: one whole measurement in one device call. For every shard count it runs bench/throughput.py
(random weights from a config directory, EOS ignored) in its own process, then prints one table:
single-stream ms/token and offline output tokens/s per degree, and each degree's ratio to the
first. Must not: be imported by the engine.

    python3 bench/tp_bench.py --num-shards 1,2            # Llama-3.1-8B shape, bf16, on 2 GPUs
    python3 bench/tp_bench.py --model-id bench/configs/smollm2-135m --num-shards 1,2 --offline 64x64x32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=str(HERE / "configs" / "llama-3.1-8b"))
    p.add_argument("--num-shards", default="1,2")
    p.add_argument("--single", default="1x128x256", help="single stream PROMPTSxINxOUT")
    p.add_argument("--offline", default="512x256x256", help="offline PROMPTSxINxOUT")
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--max-batch-prefill-tokens", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=280, help="seconds per shard count")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = p.parse_args()
    rows = []
    for n in [int(x) for x in args.num_shards.split(",")]:
        out = args.out_dir / f"tp{n}.json"
        cmd = [sys.executable, str(HERE / "throughput.py"), "--model-id", args.model_id, "--random-weights",
               "--dtype", "bfloat16", "--num-shard", str(n), "--workloads", f"{args.single},{args.offline}",
               "--max-batch-size", str(args.max_batch_size), "--max-batch-prefill-tokens",
               str(args.max_batch_prefill_tokens), "--max-top-n-tokens", "0", "--disable-prefill-logprobs",
               "--json-out", str(out)]
        for backend in ("auto", "reference"):  # the reference only if the kernel's run failed
            print(f"[tp_bench] --num-shard {n}, {backend} attention: {' '.join(cmd[2:])}", flush=True)
            start = time.perf_counter()
            try:
                rc = subprocess.run([*cmd, "--attention-backend", backend], timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            print(f"[tp_bench] --num-shard {n}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
            if rc == 0:
                rows.append((n, backend, json.loads(out.read_text())))
            if rc in (0, "timeout"):
                break
    if not rows:
        return 1
    base_single = base_offline = None
    print("\n| --num-shard | attention | mesh | warmup s (programs) | single stream ms/token | offline output tok/s | "
          "offline total tok/s | single vs first | offline vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, backend, r in rows:
        single, offline = r["workloads"]
        ms = 1000 * single["elapsed_s"] / single["output_len"]
        base_single = base_single or ms
        base_offline = base_offline or offline["output_tokens_per_s"]
        print(f"| {n} | {backend} | {r['mesh']} | {r['warmup_s']} ({r['compiled_programs']}) | {ms:.2f} | "
              f"{offline['output_tokens_per_s']:,.0f} | {offline['total_tokens_per_s']:,.0f} | "
              f"{base_single / ms:.2f}x | {offline['output_tokens_per_s'] / base_offline:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
