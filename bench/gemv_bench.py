"""Decode projections of a Llama-3.1-8B layer, one device call: how fast XLA's dots and a Pallas
(Triton) skinny matmul read the weights, against the device copy bandwidth of the same run.

Owns: timing [M, K] x [N, K]^T at decode row counts for each projection shape (separate and fused
q/k/v and gate/up), under XLA flag variants (each in a child process: XLA reads its flags once),
checking the Pallas kernel against XLA's dot. Must not: build an engine (gpu_bench.py does).

    python bench/gemv_bench.py --json-out $OUT/gemv.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

D, F, NQ, NKV, V = 4096, 14336, 4096, 1024, 128256
SHAPES = {  # name: (N, K, layers timed together)
    "q": (NQ, D, 32), "k/v": (NKV, D, 64), "qkv fused": (NQ + 2 * NKV, D, 32), "o": (D, NQ, 32),
    "gate/up": (F, D, 64), "gate_up fused": (2 * F, D, 32), "down": (D, F, 32), "lm_head": (V, D, 4),
}
VARIANTS = {
    "default": "",
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    # The autotuner tries every Triton tiling (block sizes, split-K, warps, stages), not a short list.
    "exhaustive": "--xla_gpu_exhaustive_tiling_search=true",
}
# (block_n, block_k, split_k, num_warps, num_stages)
PALLAS = [(64, 128, 1, 4, 4), (32, 256, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 8, 4),
          (64, 128, 4, 4, 4), (32, 256, 2, 4, 4)]


def _time(f, args, reps: int = 7, chain: int = 5) -> float:
    out = f(*args)
    jax_block(out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(chain):
            out = f(*args)
        jax_block(out)
        times.append((time.perf_counter() - t) / chain)
    return statistics.median(times)


def jax_block(tree) -> None:
    import jax

    jax.block_until_ready(tree)


def pallas_gemv(x, w, *, block_n, block_k, split_k, num_warps, num_stages, interpret=False):
    """x [M, K] (M <= 16, padded to Triton's 16-row dot), w [N, K] -> [M, N] in x's dtype."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    m, k = x.shape
    n = w.shape[0]
    rows = max(16, m)
    xp = jnp.pad(x, ((0, rows - m), (0, 0)))
    k_per = k // split_k

    def kernel(x_ref, w_ref, o_ref):
        j, s = pl.program_id(0), pl.program_id(1)

        def body(i, acc):
            ks = pl.ds(pl.multiple_of(s * k_per + i * block_k, block_k), block_k)
            return acc + plgpu.dot(x_ref[:, ks], w_ref[pl.ds(j * block_n, block_n), ks], trans_b=True)

        acc = jax.lax.fori_loop(0, k_per // block_k, body, jnp.zeros((rows, block_n), jnp.float32))
        o_ref[s, :, pl.ds(j * block_n, block_n)] = acc

    part = pl.pallas_call(
        kernel,
        grid=(n // block_n, split_k),
        out_shape=jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gemv",
    )(xp, w)
    return part.sum(0)[:m].astype(x.dtype)


def child(variant: str, ms: list[int], pallas: bool) -> list[dict]:
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_bench_workers import copy_bandwidth

    copy = copy_bandwidth(2 << 30)["bytes_per_s"]
    rows = [{"variant": variant, "shape": "copy", "GB/s": copy / 1e9}]
    print(f"[{variant}] copy {copy / 1e9:.0f} GB/s", file=sys.stderr, flush=True)
    key = jax.random.key(0)
    for name, (n, k, layers) in SHAPES.items():
        kw, kx = jax.random.split(jax.random.fold_in(key, n * 7 + k))
        ws = [jax.random.normal(jax.random.fold_in(kw, i), (n, k), jnp.bfloat16) * 0.02 for i in range(layers)]
        wbytes = layers * n * k * 2
        for m in ms:
            xs = [jax.random.normal(jax.random.fold_in(kx, i), (m, k), jnp.bfloat16) for i in range(layers)]
            f = jax.jit(lambda xs, ws: tuple(jnp.einsum("mk,nk->mn", x, w) for x, w in zip(xs, ws)))
            s = _time(f, (xs, ws))
            rows.append({"variant": variant, "shape": name, "m": m, "impl": "xla", "us": s / layers * 1e6,
                         "GB/s": wbytes / s / 1e9, "of_copy": wbytes / s / copy})
            print(f"[{variant}] {name} m={m} xla {s / layers * 1e6:.1f} us {wbytes / s / 1e9:.0f} GB/s",
                  file=sys.stderr, flush=True)
            if not pallas or m != ms[-1]:
                continue
            want = jnp.einsum("mk,nk->mn", xs[0].astype(jnp.float32), ws[0].astype(jnp.float32))
            for cfg in PALLAS:
                bn, bk, sk, nw, ns = cfg
                if n % bn or k % (bk * sk):
                    continue
                try:
                    g = jax.jit(lambda xs, ws, cfg=cfg: tuple(
                        pallas_gemv(x, w, block_n=cfg[0], block_k=cfg[1], split_k=cfg[2], num_warps=cfg[3],
                                    num_stages=cfg[4]) for x, w in zip(xs, ws)))
                    got = g(xs, ws)[0].astype(jnp.float32)
                    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                    s = _time(g, (xs, ws))
                except Exception as e:  # a config Triton refuses is a result, not a crash
                    rows.append({"variant": variant, "shape": name, "m": m, "impl": f"pallas {cfg}",
                                 "error": str(e)[:300]})
                    print(f"[{variant}] {name} pallas {cfg} failed: {str(e)[:300]}", file=sys.stderr, flush=True)
                    continue
                rows.append({"variant": variant, "shape": name, "m": m, "impl": f"pallas {cfg}",
                             "us": s / layers * 1e6, "GB/s": wbytes / s / 1e9, "of_copy": wbytes / s / copy,
                             "rel_err": err})
                print(f"[{variant}] {name} m={m} pallas {cfg} {s / layers * 1e6:.1f} us "
                      f"{wbytes / s / 1e9:.0f} GB/s err {err:.1e}", file=sys.stderr, flush=True)
            del xs
        del ws
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--m", default="1,8,16", help="row counts (the last also runs the Pallas configs)")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    ms = [int(x) for x in args.m.split(",")]
    if args.child:
        print("ROWS " + json.dumps(child(args.child, ms, pallas=args.child == "default")), flush=True)
        return 0
    rows = []
    for v in args.variants.split(","):
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[v]).strip()}
        r = subprocess.run([sys.executable, __file__, "--child", v, "--m", args.m], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, text=True, check=False)
        got = [line for line in r.stdout.splitlines() if line.startswith("ROWS ")]
        if r.returncode or not got:
            print(f"variant {v}: child exited {r.returncode}", flush=True)
            continue
        rows += json.loads(got[-1][5:])
        if args.json_out:
            args.json_out.write_text(json.dumps(rows, indent=1))
    print(f"\n{'variant':<15} {'shape':<14} {'m':>3} {'impl':<30} {'us':>8} {'GB/s':>6} {'copy':>5}")
    for r in rows:
        if "us" in r:
            print(f"{r['variant']:<15} {r['shape']:<14} {r['m']:>3} {r['impl']:<30} {r['us']:>8.1f} "
                  f"{r['GB/s']:>6.0f} {r['of_copy']:>5.2f}")
        elif r["shape"] == "copy":
            print(f"{r['variant']:<15} copy {r['GB/s']:.0f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
