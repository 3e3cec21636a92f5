"""The tables bench/gpu_bench.py prints, one per part, from the figures its parts return.

Owns: formatting (aligned text tables plus notes) and the derived figures a reader compares
against the targets (weight-read floor and ratio, tgx / HF, HTTP / offline). Must not: measure
anything, or import jax or the engine.
"""

from __future__ import annotations

import sys


def table(title: str, header: list[str], rows: list[list], notes: list[str] = (), align: str = "") -> None:
    """align: one of "l"/"r" per column; default: the first left, the others right."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        sides = align or "l" + "r" * (len(r) - 1)
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, sides))

    print(f"\n== {title} ==")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    for n in notes:
        print(n)
    sys.stdout.flush()


def print_single(e: dict) -> None:
    s, copy = e["single"], e["copy"]
    floor_ms = s["floor_ms_per_token"] = e["weight_bytes_read_per_step"] / copy["bytes_per_s"] * 1e3
    ms = s["decode_ms_per_token"]
    weights = f"{e['weight_bytes'] / 1e9:.2f} GB ({e['weight_bytes_read_per_step'] / 1e9:.2f} GB read per decode step)"
    bandwidth = (
        f"{copy['bytes_per_s'] / 1e9:.0f} GB/s (read + written, {copy['bytes'] / 2**30:.2f} GiB array)"
    )
    rows = [
        ["device", e["device"]],
        ["model", f"{e['model']} ({e['dtype']})"],
        ["weights", weights],
        ["copy bandwidth", bandwidth],
        ["weight-read floor", f"{floor_ms:.2f} ms/token"],
        ["decode", f"{ms:.2f} ms/token ({1e3 / ms:.1f} tokens/s)"],
        ["decode vs floor", f"{ms / floor_ms:.2f}x the floor (the floor is {floor_ms / ms:.0%} of decode)"],
        ["TTFT", f"{s['ttft_ms']:.1f} ms"],
    ]
    if prog := e.get("decode_program"):
        ops = f"{prog['entry_ops']} ops at the top level (token bucket {prog['token_bucket']})"
        rows.append(["decode program", ops])
    rows.append(["XLA_FLAGS", e.get("xla_flags") or "(none)"])
    title = (
        f"Single stream: {s['input_len']} in / {s['output_len']} out, EOS ignored, median of {len(s['runs'])}"
    )
    table(title, ["metric", "value"], rows, align="ll")


def _throughput_row(name: str, w: dict) -> list:
    return [
        f"{name} {w['input_len']} in / {w['output_len']} out",
        w["num_prompts"],
        f"{w['requests_per_s']:.2f}",
        f"{w['output_tokens_per_s']:,.0f}",
        f"{w['total_tokens_per_s']:,.0f}",
        f"{w['elapsed_s']:.1f}",
    ]


def print_offline(e: dict, hf: dict | None) -> None:
    rows = [_throughput_row("tgx", w) for w in e["offline"]]
    notes = [
        (
            f"engine: max batch {e['max_batch_size']}, prefill {e['max_batch_prefill_tokens']} tokens/step, "
            f"KV {e['kv_capacity_tokens']:,} tokens, {e['compiled_programs']} programs"
        )
    ]
    if hf and "error" not in hf:
        rows.append(_throughput_row("HF generate_batch", hf))
        ours = e["offline"][0]
        ratio = hf["tgx_vs_hf_output_tokens_per_s"] = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
        a, b = ours["first_prompt_tokens"], hf["first_prompt_tokens"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        notes += [
            (
                f"tgx / HF output tokens/s on {ours['input_len']}/{ours['output_len']}: {ratio:.2f}x (HF ran the first "
                f"{hf['num_prompts']} of the {ours['num_prompts']} prompts: rates compared, not totals)"
            ),
            (
                f"HF: transformers {hf['transformers']}, attention {hf['attn_implementation']}, timed from the first "
                f"request to the last finish ({hf['wall_s']:.1f} s with generate_batch's set-up), {hf['failed']} failed"
            ),
            (
                f"same weights: greedy tokens of prompt 0 agree for the first {agree} of {len(a)} (random weights "
                "give near-ties, which rounding differences split early)"
            ),
        ]
    elif hf:
        notes.append(f"HF comparison failed: {hf['error']}")
    header = ["run", "prompts", "req/s", "output tok/s", "total tok/s", "s"]
    table("Offline throughput (EOS ignored)", header, rows, notes)


def print_serving(s: dict) -> None:
    def med_p99(r: dict, k: str) -> str:
        return f"{r[f'median_{k}_ms']:.1f} / {r[f'p99_{k}_ms']:.1f}"

    rows = []
    for r in s["runs"]:
        if "median_ttft_ms" not in r:
            rows.append([r.get("concurrency"), "-", r.get("failed"), *["-"] * 5])
            continue
        rows.append([
            r["concurrency"], r["completed"], r["failed"], f"{r['request_throughput']:.2f}",
            f"{r['output_throughput']:,.0f}", med_p99(r, "ttft"), med_p99(r, "tpot"), med_p99(r, "itl"),
        ])  # fmt: skip
    frac = s["http_vs_offline"]
    top = s["runs"][-1].get("concurrency") if s["runs"] else "?"
    if frac is None:
        notes = [
            "HTTP vs offline: no offline run of this workload here (add --parts offline, or --offline-json)"
        ]
    else:
        notes = [f"HTTP output tok/s at concurrency {top} / offline on the same workload: {frac:.2f}"]
    for r in s["runs"]:
        if "mean_streaming" in r:
            notes.append(f"concurrency {r['concurrency']}: on average {r['mean_streaming']:.1f} requests streaming, "
                         f"{r['mean_awaiting_first_token']:.1f} awaiting their first token")
    header = ["concurrency", "done", "failed", "req/s", "out tok/s", "TTFT med/p99 ms", "TPOT med/p99 ms",
              "ITL med/p99 ms"]  # fmt: skip
    table(f"Serving: tgx serve + bench/serve.py, {s['input_len']} in / {s['output_len']} out, streamed",
          header, rows, notes)  # fmt: skip


def print_startup(rows: list[dict]) -> None:
    header = ["run", "process s", "engine start s", "warmup s", "programs", "cache hits", "cache misses"]
    cells = [
        [r["run"], f"{r['process_s']:.1f}", f"{r['engine_start_s']:.1f}", f"{r['warmup_s']:.1f}",
         r["compiled_programs"], r["cache_hits"], r["cache_misses"]]
        for r in rows
    ]  # fmt: skip
    notes = [
        f"{r['run']}: " + ", ".join(f"{k}: {n} programs, trace+lower {lo:.1f} s, compile {c:.1f} s"
                                    for k, (n, lo, c) in r.get("breakdown", {}).items())
        for r in rows
    ]  # fmt: skip
    notes.append("trace+lower runs in Python on every start; the persistent cache skips only the compile")
    table("Start-up: engine process, random weights, warmup compiles every program", header, cells, notes)
