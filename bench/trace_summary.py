"""Summarises a JAX profiler trace (the `perfetto_trace.json.gz` that tgx's profiler writes) as tables.

Owns: reading the Perfetto/Chrome JSON that jax.profiler writes next to the `.xplane.pb`, and
answering "where did the time go" for a window of engine steps: device busy fraction, idle gaps
between kernels, kernels per step, the top kernels and named scopes by device time, and the host's
`tgx.*` phases per step. Must not: need TensorBoard/XProf or anything beyond the standard library,
or guess at device rows it cannot name (a trace without device rows gives host tables only).

    python bench/trace_summary.py PROFILE_DIR_OR_FILE [--top 25] [--json-out summary.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

GAP_US = 5.0  # a device idle stretch shorter than this is a launch's ordinary tail, not a gap
_DIGITS = re.compile(r"[._]\d+$")


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise SystemExit(f"no perfetto_trace.json.gz under {path}")
    return max(found, key=os.path.getmtime)


def load(path: str) -> dict:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _union_us(intervals: list[tuple[float, float]]) -> tuple[float, list[float]]:
    """Total covered time of [start, end) intervals and the idle gaps between them."""
    busy, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append(s - end)
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def _kernel_key(e: dict) -> str:
    """The kernel's own name (fusion names are distinct programs; a CUDA graph's nodes keep theirs)."""
    return e.get("name", "?")


def _scope_key(e: dict, depth: int) -> str | None:
    """The model's named scopes (jax.named_scope) as the trace carries them in the op's long name."""
    args = e.get("args") or {}
    long = args.get("long_name") or args.get("tf_op") or args.get("name") or ""
    path = [p for p in re.split(r"[/:]", long.split(" ")[0]) if p and not p.startswith(("jit(", "pjit("))]
    scopes = [p for p in path if re.match(r"^[A-Za-z_][\w.]*$", p)]
    if not scopes:
        return None
    return "/".join(_DIGITS.sub("", s) for s in scopes[:depth])


def _step_shapes(spans: list[dict]) -> dict | None:
    """What the launched steps held, from the arguments the runner puts on `tgx.device_execute`:
    real tokens and rows against their buckets (padding waste), and how many steps carried prefill."""
    shapes = []
    for e in spans:
        a = e.get("args") or {}
        if e["name"] == "tgx.device_execute" and "t_pad" in a:
            shapes.append({k: int(a[k]) for k in ("tokens", "t_pad", "rows", "r_pad")})
    if not shapes:
        return None
    n = len(shapes)
    tokens = sum(x["tokens"] for x in shapes)
    rows = sum(x["rows"] for x in shapes)
    buckets = collections.Counter((x["t_pad"], x["r_pad"]) for x in shapes)
    return {
        "steps": n,
        "tokens_per_step": tokens / n,
        "rows_per_step": rows / n,
        "token_padding": 1 - tokens / sum(x["t_pad"] for x in shapes),
        "row_padding": 1 - rows / sum(x["r_pad"] for x in shapes),
        # A row with more than one token is a prefill chunk: tokens - rows > 0 means some prefill.
        "steps_with_prefill": sum(1 for x in shapes if x["tokens"] > x["rows"]) / n,
        "buckets": {f"{t}x{r}": c for (t, r), c in buckets.most_common(8)},
    }


def summarize(events: list[dict], top: int = 25, window: tuple[float, float] | None = None) -> dict:
    """window (start, end) in trace µs; default: from the first tgx.step start to the last end."""
    pname, tname = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e["pid"], e["tid"])] = e["args"]["name"]
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device_pids = {p for p, n in pname.items() if n.startswith("/device:") and "CPU" not in n}
    steps = sorted((e for e in spans if e["name"] == "tgx.step"), key=lambda e: e["ts"])
    if window is None:
        if steps:
            window = (steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"])
        else:
            window = (min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans))
    lo, hi = window
    inside = [e for e in spans if e["ts"] >= lo and e["ts"] + e["dur"] <= hi]
    n_steps = max(1, sum(1 for e in steps if lo <= e["ts"] <= hi))
    wall = hi - lo
    out: dict = {"window_us": wall, "steps": n_steps, "ms_per_step": wall / n_steps / 1e3}

    host = collections.defaultdict(float)
    for e in inside:
        if e["pid"] not in device_pids and e["name"].startswith("tgx."):
            host[e["name"]] += e["dur"]
    out["host_phases_ms_per_step"] = {
        k: v / n_steps / 1e3 for k, v in sorted(host.items(), key=lambda kv: -kv[1])
    }

    out["step_shapes"] = _step_shapes(inside)

    kernels = [e for e in inside if e["pid"] in device_pids]
    if not kernels:
        out["device"] = None
        return out
    modules = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        if tname.get((e["pid"], e["tid"]), "") == "XLA Modules":
            m = modules[_DIGITS.sub("", e["name"].split("(")[0])]
            m[0] += e["dur"]
            m[1] += 1
    streams = collections.Counter(tname.get((e["pid"], e["tid"]), str(e["tid"])) for e in kernels)
    # A device's rows also carry derived "XLA Ops"/"XLA Modules" ranges that enclose the kernels:
    # counting them too would double the time. The "Stream #N" rows hold the kernels themselves.
    on_streams = [e for e in kernels if tname.get((e["pid"], e["tid"]), "").startswith("Stream")]
    kernels = on_streams or kernels
    compute = [e for e in kernels if "memcpy" not in e["name"].lower()]
    busy, gaps = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in compute])
    real_gaps = [g for g in gaps if g >= GAP_US]
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    for e in compute:
        k = by_kernel[_kernel_key(e)]
        k[0] += e["dur"]
        k[1] += 1
    by_scope = collections.defaultdict(float)
    for e in compute:
        s = _scope_key(e, 3)
        by_scope[s or "(no scope)"] += e["dur"]
    memcpy = [e for e in kernels if "memcpy" in e["name"].lower()]
    out["device"] = {
        "rows": dict(streams.most_common()),
        "busy_ms_per_step": busy / n_steps / 1e3,
        "busy_fraction": busy / wall,
        "kernels_per_step": len(compute) / n_steps,
        "kernel_ms_per_step": sum(e["dur"] for e in compute) / n_steps / 1e3,
        "gaps_per_step": len(real_gaps) / n_steps,
        "gap_ms_per_step": sum(real_gaps) / n_steps / 1e3,
        "largest_gaps_ms": [g / 1e3 for g in sorted(real_gaps, reverse=True)[:8]],
        "memcpy_ms_per_step": sum(e["dur"] for e in memcpy) / n_steps / 1e3,
        "modules": {
            k: {"ms_per_step": v[0] / n_steps / 1e3, "calls_per_step": v[1] / n_steps}
            for k, v in sorted(modules.items(), key=lambda kv: -kv[1][0])
        },
        "top_kernels": [
            {
                "name": k,
                "ms_per_step": v[0] / n_steps / 1e3,
                "calls_per_step": v[1] / n_steps,
                "us_per_call": v[0] / v[1],
            }
            for k, v in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "top_scopes": [
            {"scope": k, "ms_per_step": v / n_steps / 1e3}
            for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])[:top]
        ],
    }
    return out


def print_summary(title: str, s: dict) -> None:
    print(f"\n== trace: {title}: {s['steps']} steps, {s['ms_per_step']:.3f} ms/step of wall time ==")
    d = s.get("device")
    if d:
        print(
            f"device busy {d['busy_ms_per_step']:.3f} ms/step ({d['busy_fraction']:.1%} of wall); "
            f"{d['kernels_per_step']:.0f} kernels/step summing {d['kernel_ms_per_step']:.3f} ms; "
            f"idle gaps >= {GAP_US:g} us: {d['gaps_per_step']:.1f}/step, {d['gap_ms_per_step']:.3f} ms/step; "
            f"memcpy {d['memcpy_ms_per_step']:.3f} ms/step"
        )
        print("largest gaps (ms): " + ", ".join(f"{g:.3f}" for g in d["largest_gaps_ms"]))
        print(f"device rows: {d['rows']}")
        for k, v in d["modules"].items():
            print(f"program {k}: {v['ms_per_step']:.3f} ms/step over {v['calls_per_step']:.1f} runs/step")
        print(f"{'kernel':<60} {'ms/step':>8} {'calls':>6} {'us/call':>8}")
        for k in d["top_kernels"]:
            print(
                f"{k['name'][:60]:<60} {k['ms_per_step']:8.3f} {k['calls_per_step']:6.1f} {k['us_per_call']:8.1f}"
            )
        print(f"{'scope':<60} {'ms/step':>8}")
        for k in d["top_scopes"]:
            print(f"{k['scope'][:60]:<60} {k['ms_per_step']:8.3f}")
    else:
        print("no device rows in this trace (a CPU run): host phases only")
    if sh := s.get("step_shapes"):
        print(
            f"step shapes: {sh['tokens_per_step']:.0f} tokens and {sh['rows_per_step']:.0f} rows per launched step; "
            f"padding {sh['token_padding']:.0%} of tokens, {sh['row_padding']:.0%} of rows; "
            f"{sh['steps_with_prefill']:.0%} of steps carry prefill; buckets (tokens x rows: steps) {sh['buckets']}"
        )
    print(
        "host phases, ms/step: " + ", ".join(f"{k} {v:.3f}" for k, v in s["host_phases_ms_per_step"].items())
    )
    sys.stdout.flush()


def report(path: str, title: str, copy_to: Path | None = None) -> dict:
    """Summarises and prints the trace at `path`; with copy_to, keeps the trace there as well."""
    summary = summarize(load(path))
    print_summary(title, summary)
    if copy_to is not None:
        copy_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy_to)
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a profile directory (searched) or a perfetto_trace.json.gz")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    path = find_trace(args.path)
    s = summarize(load(path), args.top)
    print_summary(path, s)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(s, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
