"""Attention kernel benchmark: the GPU ragged paged attention kernel vs the pure-JAX reference and
vs the device's own ceilings (copy bandwidth, bf16 matmul rate) measured in the same run.

Owns: building synthetic paged steps (shuffled pages) and timing whole attention calls (cache write,
plan, kernels, merge), dispatched back to back so host gaps stay out. Must not: be imported by the
engine, or need anything beyond jax (the device machine has no serving extras).

Cases: decode (B requests x 1 token at context C), prefill of one 4096-token prompt and of 4 x 1024,
and a mixed step (a 1024-token chunk beside B - 1 decodes). Decode reports KV bytes read per second
(B x C x K x H x 2 x itemsize over time) against a device copy (bytes read + written); prefill reports
causal FLOP/s (2 x 2 x L^2 / 2 x N x H per request) against an 8192^3 bf16 matmul.

    python bench/kernel_bench.py                  # tuned sizes vs reference, one table
    python bench/kernel_bench.py --sweep          # also time block-size variants (for tuning)
    python bench/kernel_bench.py --json-out r.json
    python bench/kernel_bench.py --lone           # one request decoding alone, chained (tuning one stream)
    JAX_PLATFORMS=cpu python bench/kernel_bench.py --interpret --batch 4 --context 64 --prefill-len 64  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.pallas_kernels.ragged_paged_attention import AttentionMetadata, ragged_paged_attention
from engine.pallas_kernels.ragged_paged_attention_gpu import (
    BlockSizes,
    DecodeBlocks,
    PrefillBlocks,
    block_sizes_for,
    ragged_paged_attention_gpu,
)

# The deprecation notice of the Pallas Triton backend repeats on every lowering.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


@dataclasses.dataclass(frozen=True)
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"


def make_step(requests, *, num_tokens, num_rows, page_size, seed):
    """requests: (cached context, new tokens). Pages shuffled; page 0 is the trash page."""
    rng = np.random.default_rng(seed)
    pages_needed = [-(-(ctx + new) // page_size) for ctx, new in requests]
    free = list(rng.permutation(np.arange(1, sum(pages_needed) + 1)))
    max_pages = max(pages_needed)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.arange(num_tokens, dtype=np.int32) % page_size
    token_seq = np.zeros(num_tokens, np.int32)
    page_table = np.zeros((num_rows, max_pages), np.int32)
    seq_lens = np.zeros(num_rows, np.int32)
    t = 0
    for row, ((ctx, new), n_pages) in enumerate(zip(requests, pages_needed)):
        pages = np.asarray([free.pop() for _ in range(n_pages)], np.int32)
        pos = np.arange(ctx, ctx + new)
        span = slice(t, t + new)
        positions[span], token_seq[span] = pos, row
        slot_mapping[span] = pages[pos // page_size] * page_size + pos % page_size
        page_table[row, :n_pages] = pages
        seq_lens[row] = ctx + new
        t += new
    assert t <= num_tokens and len(requests) <= num_rows
    md = AttentionMetadata(*map(jnp.asarray, (positions, slot_mapping, token_seq, page_table, seq_lens)))
    return md, sum(pages_needed) + 1


def time_attention(attn, inputs, *, n_inner, repeats):
    """Median seconds per attention call; returns (seconds, the cache to reuse).

    Calls are dispatched back to back (each output is the next call's q, the cache is donated) and
    synchronized once per n_inner: host dispatch overlaps device work for calls of 100 us or more.
    """
    q, k, v, cache, md = inputs
    run = jax.jit(attn, donate_argnums=(3,))
    out, cache = run(q, k, v, cache, md)  # compile and warm up (an output as q can compile again)
    out, cache = run(out, k, v, cache, md)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_inner):
            out, cache = run(out, k, v, cache, md)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n_inner, cache


def time_fn(fn, *args, repeats=10, n_inner=1):
    """Median seconds per call of fn(*args), n_inner calls dispatched per synchronization."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / n_inner


def breakdown(inputs, sizes: BlockSizes, sm_scale: float, *, n_inner: int, repeats: int,
              interpret: bool = False) -> tuple[dict[str, float], jax.Array]:
    """Seconds per call of each stage of the kernel path (stages under ~30 us read as dispatch time).

    Returns the times and the cache (the input cache is donated).
    """
    from engine.pallas_kernels.ragged_paged_attention.reference import write_kv
    from engine.pallas_kernels.ragged_paged_attention_gpu import kernel
    from engine.pallas_kernels.ragged_paged_attention_gpu.plan import D_TOK, build_plan

    q, k, v, cache, md = inputs
    t, n, h = q.shape
    _, p, s, kh, _ = cache.shape
    sh = kernel.Shapes(num_tokens=t, num_kv_heads=kh, group=n // kh, head_dim=h, page_size=s,
                       max_pages=md.page_table.shape[1], sm_scale=sm_scale, soft_cap=None, dot_precision=None)
    pre = dataclasses.replace(sizes.prefill, rows=max(sizes.prefill.rows, sh.group_pow2))
    plan_fn = jax.jit(lambda md: build_plan(md, block_tokens=pre.rows // sh.group_pow2, sliding_window=None))
    plan = plan_fn(md)
    qg, kv_flat = q, cache.reshape(2, p * s, kh, h)  # q heads flat: row k * G + g
    pre_fn = jax.jit(lambda *a: kernel.prefill_attention(*a, cfg=pre, sh=sh, interpret=interpret))
    dec_fn = jax.jit(lambda *a: kernel.decode_attention(*a, cfg=sizes.decode, sh=sh, interpret=interpret))
    partials = dec_fn(plan, md.page_table, qg, kv_flat)
    out = pre_fn(plan, md.page_table, qg, kv_flat)

    def merge(partials, out, tok):
        return out.at[tok].set(kernel.combine(*partials).astype(out.dtype), mode="drop")

    write = jax.jit(write_kv, donate_argnums=(0,))
    state = {"cache": cache}  # donated from here on: the caller takes state["cache"] back

    def write_step():
        state["cache"] = write(state["cache"], k, v, md.slot_mapping)
        return state["cache"]

    timed = {
        "write_kv": (write_step,),
        "plan": (plan_fn, md),
        "prefill kernel": (pre_fn, plan, md.page_table, qg, kv_flat),
        "decode kernel": (dec_fn, plan, md.page_table, qg, kv_flat),
        "combine+scatter": (jax.jit(merge), partials, out, plan.decodes[D_TOK]),
    }
    times = {name: time_fn(fn, *a, repeats=repeats, n_inner=n_inner) for name, (fn, *a) in timed.items()}
    return times, state["cache"]


def ceilings(small: bool = False):
    """(copy bytes/s counting read + write, bf16 matmul FLOP/s), measured on random data.

    The copy ceiling is the faster of a plain device copy and a float32 scale of the same 1 GiB.
    """
    size = 1 << (20 if small else 28)  # float32 elements: 1 GiB on a device
    x = jax.random.normal(jax.random.key(0), (size,), jnp.float32)
    scale = jnp.asarray(1.001, jnp.float32)  # a runtime operand, so the multiply is not folded away
    copy_s = min(time_fn(jax.jit(lambda x: x.copy()), x), time_fn(jax.jit(lambda x, s: x * s), x, scale))
    del x
    n = 512 if small else 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm_s = time_fn(jax.jit(jnp.dot), a, b)
    return 2 * 4 * size / copy_s, 2 * n**3 / mm_s


def case_inputs(shape: Shape, requests, *, num_tokens, num_rows, seed):
    md, num_pages = make_step(requests, num_tokens=num_tokens, num_rows=num_rows,
                              page_size=shape.page_size, seed=seed)
    dt = jnp.dtype(shape.dtype)
    keys = jax.random.split(jax.random.key(seed), 4)
    n, k, h = shape.num_heads, shape.num_kv_heads, shape.head_dim
    cache = jax.random.normal(keys[0], (2, num_pages, shape.page_size, k, h), dt)
    q = jax.random.normal(keys[1], (num_tokens, n, h), dt)
    kk = jax.random.normal(keys[2], (num_tokens, k, h), dt)
    v = jax.random.normal(keys[3], (num_tokens, k, h), dt)
    return q, kk, v, cache, md


def cases(shape: Shape, batch: int, context: int, prefill: int):
    """name -> (requests, num_tokens, num_rows, kind, amount): amount is KV bytes or causal FLOPs."""
    n, k, h = shape.num_heads, shape.num_kv_heads, shape.head_dim
    item = jnp.dtype(shape.dtype).itemsize
    flops = lambda lens: sum(2 * 2 * L * L // 2 * n * h for L in lens)
    quarter, chunk = prefill // 4, prefill // 4
    small, long = max(1, batch // 8), 2 * context
    return {
        f"decode B={batch} ctx={context}": (
            [(context - 1, 1)] * batch, batch, batch, "bytes", batch * context * k * h * 2 * item),
        f"decode B={small} ctx={long}": (
            [(long - 1, 1)] * small, small, small, "bytes", small * long * k * h * 2 * item),
        f"prefill 1x{prefill}": ([(0, prefill)], prefill, 8, "flops", flops([prefill])),
        f"prefill 4x{quarter}": ([(0, quarter)] * 4, prefill, 8, "flops", flops([quarter] * 4)),
        f"mixed {chunk} chunk + {batch - 1} decodes": (
            [(chunk, chunk)] + [(context - 1, 1)] * (batch - 1), chunk + batch, batch, "time", 0),
    }


SWEEP_DECODE = [  # block_kv, num_splits, min_split_blocks, num_warps, num_stages, prefetch_pages
    (64, 4, 8, 4, 3, False), (64, 1, 1, 4, 3, True), (64, 2, 8, 4, 3, True), (64, 8, 4, 4, 3, True),
    (64, 4, 8, 4, 2, True), (128, 4, 4, 4, 3, True), (32, 4, 16, 4, 3, True), (64, 4, 8, 8, 3, True),
]
SWEEP_PREFILL = [  # rows, block_kv, num_warps, num_stages, prefetch_pages
    (128, 64, 8, 3, False), (256, 64, 8, 2, False), (256, 64, 8, 2, True), (128, 128, 8, 2, True),
    (64, 64, 4, 3, True), (128, 64, 8, 4, True), (128, 32, 8, 3, True),
]


# A lone decode (one request, 1-token bucket): block_kv, splits, min_split_blocks, warps, stages,
# prefetch; fill=0 keeps each as given (the tuned row widens to 16 splits by occupancy).
SWEEP_LONE = [
    (64, 16, 1, 4, 3, False), (64, 16, 1, 4, 3, True), (32, 16, 1, 4, 3, True), (64, 8, 1, 4, 3, True),
    (64, 4, 1, 4, 3, True), (64, 2, 1, 4, 3, True), (32, 1, 1, 4, 3, True), (64, 1, 1, 4, 3, True),
    (64, 1, 1, 4, 4, True), (64, 1, 1, 8, 3, True), (64, 1, 1, 4, 3, False), (128, 1, 1, 4, 2, True),
    (128, 1, 1, 8, 2, True), (128, 1, 1, 8, 3, True), (256, 1, 1, 8, 2, True),
]
CHAIN = 64  # attention calls per timed program in --lone (one dispatch, so device time dominates)


def time_chain(attn, inputs, *, n_inner, repeats):
    """Device seconds per call of a lone decode: CHAIN calls in one program, each output the next q."""
    q, k, v, cache, md = inputs

    def chain(q, cache):
        for _ in range(CHAIN):
            q, cache = attn(q, k, v, cache, md)
        return q, cache

    run = jax.jit(chain, donate_argnums=(1,))
    state = {"q": q, "cache": cache}

    def step():
        state["q"], state["cache"] = run(state["q"], state["cache"])
        return state["q"]

    return time_fn(step, repeats=repeats, n_inner=n_inner) / CHAIN, state["cache"]


def launch_floor(n_inner, repeats):
    """Seconds per kernel of CHAIN dependent tiny XLA kernels (a reduce each): the launch floor."""
    def chain(x):
        for _ in range(CHAIN):
            x = x * (1.0 + 1e-6 * jnp.sum(x))
        return x
    return time_fn(jax.jit(chain), jnp.ones((4096,), jnp.float32), repeats=repeats, n_inner=n_inner) / CHAIN


def _time_variant(timer, inputs, sizes: BlockSizes, label: str, scale: float, args):
    """(seconds per call or None, inputs with the returned cache): `timer` (time_attention or
    time_chain) over the kernel at `sizes`. A variant that does not compile is reported and skipped."""
    attn = functools.partial(ragged_paged_attention_gpu, sm_scale=scale, block_sizes=sizes, interpret=args.interpret)
    try:
        seconds, cache = timer(attn, inputs, n_inner=args.n_inner, repeats=args.repeats)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is skipped, loudly
        print(f"  {label} failed: {type(e).__name__}: {str(e)[:200]}")
        return None, inputs
    return seconds, (*inputs[:3], cache, inputs[4])


def lone_main(args, shape: Shape, tuned: BlockSizes) -> list[dict]:
    """--lone: one request decoding alone at a few contexts, the tuned sizes and SWEEP_LONE."""
    rows = []
    floor = launch_floor(args.n_inner, args.repeats)
    print(f"  launch floor (tiny dependent XLA kernel): {floor * 1e6:.2f} us", flush=True)
    rows.append({"case": "launch floor", "impl": "xla", "sizes": "-", "us": floor * 1e6})
    variants = [("tuned", tuned)] + [
        ("kernel", dataclasses.replace(tuned, decode=DecodeBlocks(*d[:5], prefetch_pages=d[5], fill=0)))
        for d in SWEEP_LONE]
    scale = shape.head_dim**-0.5
    for seed, ctx in enumerate(args.lone_contexts):
        inputs = case_inputs(shape, [(ctx - 1, 1)], num_tokens=1, num_rows=1, seed=seed)
        for impl, sizes in variants:
            label = _label(sizes, "bytes")
            seconds, inputs = _time_variant(time_chain, inputs, sizes, f"lone ctx={ctx:<6d} {label:28s}", scale, args)
            if seconds is None:
                continue
            rows.append({"case": f"lone decode ctx={ctx}", "impl": impl, "sizes": label, "us": seconds * 1e6})
            print(f"  lone ctx={ctx:<6d} {impl:6s} {label:28s} {seconds * 1e6:8.2f} us", flush=True)
    return rows


def sweep_variants(tuned: BlockSizes, kind: str) -> list[BlockSizes]:
    if kind == "bytes":
        return [dataclasses.replace(tuned, decode=DecodeBlocks(*d[:5], prefetch_pages=d[5])) for d in SWEEP_DECODE]
    return [dataclasses.replace(tuned, prefill=PrefillBlocks(*p[:4], prefetch_pages=p[4])) for p in SWEEP_PREFILL]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--interpret", action="store_true", help="Pallas CPU interpreter (smoke test only)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--n-inner", type=int, default=20, help="calls per timed stretch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="also time the block-size variants")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--lone", action="store_true",
                        help="only a lone decode (1-token step), chained, over SWEEP_LONE (tuning one stream)")
    parser.add_argument("--lone-contexts", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024])
    args = parser.parse_args()

    shape = Shape(dtype=args.dtype)
    device = jax.devices()[0].device_kind
    copy_bw, mm_rate = ceilings(small=args.interpret)
    tuned = block_sizes_for(device, shape.head_dim, shape.dtype)
    print(f"device: {device}; copy {copy_bw / 1e12:.2f} TB/s (read+write); bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s",
          flush=True)
    scale = shape.head_dim**-0.5
    rows = []
    if args.lone:
        rows = lone_main(args, shape, tuned)
        if args.json_out:
            args.json_out.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
        return

    def record(case, impl, sizes, seconds, kind, amount):
        row = {"case": case, "impl": impl, "sizes": sizes, "us": seconds * 1e6}
        if kind == "bytes":
            row.update(achieved=f"{amount / seconds / 1e12:.2f} TB/s", of_ceiling=amount / seconds / copy_bw)
        elif kind == "flops":
            row.update(achieved=f"{amount / seconds / 1e12:.0f} TFLOP/s", of_ceiling=amount / seconds / mm_rate)
        rows.append(row)
        pct = f"{row['of_ceiling']:.0%}" if "of_ceiling" in row else ""
        print(f"  {case:32s} {impl:10s} {sizes:28s} {row['us']:10.1f} us {row.get('achieved', ''):>14s} {pct:>5s}",
              flush=True)

    all_cases = cases(shape, args.batch, args.context, args.prefill_len)
    for seed, (case, (requests, t, r, kind, amount)) in enumerate(all_cases.items()):
        inputs = case_inputs(shape, requests, num_tokens=t, num_rows=r, seed=seed)
        variants = [("kernel", tuned)]
        if args.sweep and kind != "time":
            variants += [("kernel", sizes) for sizes in sweep_variants(tuned, kind)]
        for impl, sizes in variants:
            label = _label(sizes, kind)
            seconds, inputs = _time_variant(time_attention, inputs, sizes, f"{case:32s} {impl:10s} {label:28s}",
                                            scale, args)
            if seconds is None:
                continue
            record(case, impl, label, seconds, kind, amount)
        if args.sweep and case.startswith(f"decode B={args.batch} "):
            stages, cache = breakdown(inputs, tuned, scale, n_inner=args.n_inner, repeats=args.repeats,
                                      interpret=args.interpret)
            inputs = (*inputs[:3], cache, inputs[4])
            for stage, seconds in stages.items():
                print(f"  {case:32s} stage {stage:20s} {seconds * 1e6:10.1f} us", flush=True)
        if not args.no_reference:
            attn = functools.partial(ragged_paged_attention, sm_scale=scale)
            seconds, cache = time_attention(attn, inputs, n_inner=3, repeats=3)
            record(case, "reference", "-", seconds, kind, amount)
        del inputs

    print("\n| case | impl | sizes | time (us) | achieved | of ceiling |\n|---|---|---|---|---|---|")
    for row in rows:
        pct = f"{row['of_ceiling']:.0%}" if "of_ceiling" in row else ""
        print(f"| {row['case']} | {row['impl']} | {row['sizes']} | {row['us']:.1f} | {row.get('achieved', '')} | {pct} |")
    print(f"\nceilings: copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s; "
          f"device {device}")
    if args.json_out:
        report = {"device": device, "copy_bytes_per_s": copy_bw, "matmul_flops": mm_rate, "rows": rows}
        args.json_out.write_text(json.dumps(report, indent=1))


def _label(sizes: BlockSizes, kind: str) -> str:
    d, p = sizes.decode, sizes.prefill
    dec = (f"d kv{d.block_kv} s{d.num_splits}/{d.min_split_blocks} w{d.num_warps} st{d.num_stages}"
           f"{'' if d.prefetch_pages else ' nopf'}")
    pre = f"p r{p.rows} kv{p.block_kv} w{p.num_warps} st{p.num_stages}{'' if p.prefetch_pages else ' nopf'}"
    return {"bytes": dec, "flops": pre}.get(kind, f"{pre}; {dec}")


if __name__ == "__main__":
    main()
