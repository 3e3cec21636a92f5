"""Decode projections of a Llama-3.1-8B layer, one device call: how fast XLA's dots and Pallas
(Triton) GEMVs read the weights, against the device copy bandwidth of the same run.

Owns: timing [M, K] x [N, K]^T at decode row counts for each projection shape (separate and fused
q/k/v and gate/up), under XLA flag variants (each in a child process: XLA reads its flags once),
checking the Pallas kernels against XLA's dot; and, with --fused, each one-row projection with the
epilogue a layer gives it (1/rms, rope, SiLU x up, residual) as XLA runs it against the fused GEMV
of engine.pallas_kernels.gemv_gpu at every tiling, then a chain of layers both ways. Must not:
build an engine (gpu_bench.py does).

    python bench/gemv_bench.py --json-out $OUT/gemv.json
    python bench/gemv_bench.py --fused --json-out $OUT/gemv-fused.json
"""

from __future__ import annotations

import argparse
import functools
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


# name: (N, K, epilogue) of a Llama-3.1-8B layer's projections as a one-row decode step runs them.
FUSED_SHAPES = {"qkv+rms+rope": (NQ + 2 * NKV, D, "rope"), "o+res": (D, NQ, "res"),
                "gate_up+rms+silu": (2 * F, D, "gated"), "down+res": (D, F, "res")}
# (block_n, block_k, num_warps, num_stages) tried for the fused Pallas GEMV.
FUSED_BLOCKS = [(8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 4, 4), (8, 512, 8, 3), (8, 1024, 4, 3),
                (8, 1024, 8, 2), (8, 2048, 8, 2), (4, 1024, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3),
                (16, 512, 8, 3), (16, 1024, 8, 2), (32, 256, 8, 3), (32, 512, 8, 3)]
EPS = 1e-5
HEAD = 128


def _cos_sin():
    """cos, sin [1, HEAD] of position 300 under Llama's rope theta."""
    import jax.numpy as jnp

    from engine.models.config import RopeScaling
    from engine.models.layers.rope import rope_cos_sin, rope_inv_freq

    return rope_cos_sin(jnp.array([300]), rope_inv_freq(HEAD, 500000.0, RopeScaling()))


def _xla_proj(x, w, kind, res):
    """One projection and its epilogue the way the XLA model runs them (engine.models.layers)."""
    import jax
    import jax.numpy as jnp

    y = jnp.einsum("mk,nk->mn", x, w)
    if kind in ("rms", "gated", "rope"):
        xf = x.astype(jnp.float32)
        s = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)
        y = (y.astype(jnp.float32) * s).astype(y.dtype)
    if kind == "gated":
        g, u = jnp.split(y, 2, axis=-1)
        y = jax.nn.silu(g) * u
    if kind == "res":
        y = res + y
    if kind == "rope":  # as engine.models.layers.attention turns a fused q/k/v
        from engine.models.layers.rope import apply_rope

        heads = y.reshape(1, -1, HEAD)
        is_v = jnp.arange(heads.shape[1]) >= (NQ + NKV) // HEAD
        y = jnp.where(is_v[None, :, None], heads, apply_rope(heads, *_cos_sin())).reshape(y.shape)
    return y


def _pallas_proj(x, w, kind, res, blocks):
    import jax

    from engine.pallas_kernels.gemv_gpu.kernel import gemv

    rope = kind == "rope"
    return gemv(x, w, residual=res if kind == "res" else None, rms_eps=None if kind == "res" else EPS,
                act=jax.nn.silu if kind == "gated" else None, rope=_cos_sin() if rope else None,
                rope_heads=(NQ + NKV) // HEAD if rope else None, blocks=blocks)


def fused_child(layers: int) -> list[dict]:
    """Each projection with its epilogue, XLA vs the fused Pallas GEMV (every tiling), then a chain
    of `layers` layers (the four projections, a stand-in for rope/attention) both ways."""
    import jax
    import jax.numpy as jnp

    from engine.pallas_kernels.gemv_gpu import GemvBlocks, gemv_reference
    from engine.pallas_kernels.gemv_gpu.tuned_block_sizes import fits, pairing_of

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_bench_workers import copy_bandwidth

    copy = copy_bandwidth(2 << 30)["bytes_per_s"]
    rows = [{"variant": "fused", "shape": "copy", "GB/s": copy / 1e9}]
    print(f"[fused] copy {copy / 1e9:.0f} GB/s", file=sys.stderr, flush=True)
    key = jax.random.key(1)
    weights, best = {}, {}
    for name, (n, k, kind) in FUSED_SHAPES.items():
        kw, kx = jax.random.split(jax.random.fold_in(key, n * 7 + k))
        ws = [jax.random.normal(jax.random.fold_in(kw, i), (n, k), jnp.bfloat16) * 0.02 for i in range(layers)]
        weights[name] = ws
        out_n = n // 2 if kind == "gated" else n
        xs = [jax.random.normal(jax.random.fold_in(kx, i), (1, k), jnp.bfloat16) for i in range(layers)]
        rs = [jax.random.normal(jax.random.fold_in(kx, 1000 + i), (1, out_n), jnp.bfloat16) for i in range(layers)]
        wbytes = layers * n * k * 2
        impls = [("xla", None)] + [(f"pallas {c}", GemvBlocks(*c)) for c in FUSED_BLOCKS
                                   if fits(n, k, GemvBlocks(*c), pairing_of(n, gated=kind == "gated",
                                                                            rope_dim=HEAD if kind == "rope" else None))]
        want = gemv_reference(xs[0], ws[0], residual=rs[0] if kind == "res" else None,
                              rms_eps=EPS if kind != "res" else None, act=jax.nn.silu if kind == "gated" else None,
                              rope=_cos_sin() if kind == "rope" else None,
                              rope_heads=(NQ + NKV) // HEAD if kind == "rope" else None).astype(jnp.float32)
        for label, blocks in impls:
            def many(xs, ws, rs, blocks=blocks):
                if blocks is None:
                    return tuple(_xla_proj(x, w, kind, r) for x, w, r in zip(xs, ws, rs))
                return tuple(_pallas_proj(x, w, kind, r, blocks) for x, w, r in zip(xs, ws, rs))
            try:
                f = jax.jit(many)
                got = f(xs, ws, rs)[0].astype(jnp.float32)
                err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
                s = _time(f, (xs, ws, rs))
            except Exception as e:  # a tiling Triton refuses is a result, not a crash
                print(f"[fused] {name} {label} failed: {str(e)[:300]}", file=sys.stderr, flush=True)
                continue
            row = {"variant": "fused", "shape": name, "m": 1, "impl": label, "us": s / layers * 1e6,
                   "GB/s": wbytes / s / 1e9, "of_copy": wbytes / s / copy, "rel_err": err}
            rows.append(row)
            if blocks is not None and (name not in best or row["us"] < best[name][0]):
                best[name] = (row["us"], blocks)
            print(f"[fused] {name} {label} {row['us']:.1f} us {row['GB/s']:.0f} GB/s err {err:.1e}",
                  file=sys.stderr, flush=True)
        del xs, rs

    def chain(x, ws, pallas):
        for i in range(layers):
            def proj(name, x, res=None):
                kind = FUSED_SHAPES[name][2]
                w = ws[name][i]
                return _pallas_proj(x, w, kind, res, best[name][1]) if pallas else _xla_proj(x, w, kind, res)
            qkv = proj("qkv+rms+rope", x)
            a = (qkv[:, :NQ].astype(jnp.float32) * 1.0001).astype(x.dtype)  # stands in for attention
            h = proj("o+res", a, x)
            x = proj("down+res", proj("gate_up+rms+silu", h), h)
        return x

    x0 = jax.random.normal(jax.random.fold_in(key, 5), (1, D), jnp.bfloat16)
    total = sum(layers * n * k * 2 for n, k, _ in FUSED_SHAPES.values())
    for label, pallas in (("xla", False), ("pallas", True), ("xla", False), ("pallas", True)):
        f = jax.jit(functools.partial(chain, pallas=pallas))
        s = _time(f, (x0, weights))
        rows.append({"variant": "fused", "shape": f"chain of {layers} layers", "m": 1, "impl": label,
                     "us": s * 1e6, "GB/s": total / s / 1e9, "of_copy": total / s / copy})
        print(f"[fused] chain {label} {s * 1e6:.0f} us {total / s / copy:.3f} of copy", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--m", default="1,8,16", help="row counts (the last also runs the Pallas configs)")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--fused", action="store_true",
                   help="one-row projections with their epilogues: XLA vs the fused Pallas GEMV, alone and as a layer chain")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    ms = [int(x) for x in args.m.split(",")]
    if args.fused:
        rows = fused_child(args.layers)
        if args.json_out:
            args.json_out.write_text(json.dumps(rows, indent=1))
        _print_rows(rows)
        return 0
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
    _print_rows(rows)
    return 0


def _print_rows(rows: list[dict]) -> None:
    print(f"\n{'variant':<15} {'shape':<18} {'m':>3} {'impl':<30} {'us':>8} {'GB/s':>6} {'copy':>5}")
    for r in rows:
        if "us" in r:
            print(f"{r['variant']:<15} {r['shape']:<18} {r['m']:>3} {r['impl']:<30} {r['us']:>8.1f} "
                  f"{r['GB/s']:>6.0f} {r['of_copy']:>5.2f}")
        elif r["shape"] == "copy":
            print(f"{r['variant']:<15} copy {r['GB/s']:.0f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
