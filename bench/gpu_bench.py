"""One-call device benchmark of a Llama-3.1-8B-shaped model with random weights made on the device.

Owns: running the parts below in one invocation, each in child processes (every part gets the whole
device: JAX keeps what it allocated until its process exits), printing one table per part as soon
as it is done and writing everything as JSON (--json-out, rewritten after each part). Must not:
import jax, or stop at a failed part: it is reported and the next part runs (exit status 1 at the end).

Parts (--parts, default all five):
  single   one request at a time (128 in / 256 out, EOS ignored): TTFT and decode ms/token against
           the weight-read floor = bytes one decode step reads / device copy bandwidth (same run)
  offline  --num-prompts prompts of each --workloads shape (256x256, 1024x128) through the engine:
           requests/s, output and total tokens/s; HF transformers' generate_batch on the same
           weights and the first workload (--hf-num-prompts of its prompts) gives the ratio
  profile  JAX profiler traces of the engine: single-stream decode, a 64-request decode batch and the
           1024-in / 128-out mix at the batch limit, each summarised (device busy, gaps, top kernels,
           host phases); the traces are copied to --trace-out
  serving  `tgx serve` + bench/serve.py at each --concurrency (1024 in / 128 out): TTFT, TPOT, ITL
           median and p99; HTTP output tokens/s at the highest concurrency as a fraction of offline
  startup  engine start cold (empty --compilation-cache-dir) and again warm: warmup compile seconds,
           compiled programs, persistent-cache hits

    python bench/gpu_bench.py --json-out gpu.json                # everything, on the device
    python bench/gpu_bench.py --parts single,offline --hf-num-prompts 128
    JAX_PLATFORMS=cpu python bench/gpu_bench.py --model-id bench/configs/smollm2-135m --dtype float32 \\
        --max-batch-size 8 --max-total-tokens 256 --num-prompts 8 --hf-num-prompts 2 --workloads 32x16,96x8 \\
        --single-input-len 16 --single-output-len 16 --concurrency 1,4 --serve-input-len 96 \\
        --serve-output-len 8 --serve-min-prompts 4 --copy-mib 64            # CPU smoke of every part
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.cli import add_engine_flags

PARTS = ("single", "offline", "profile", "serving", "startup")
DEFAULT_MODEL = str(REPO / "bench" / "configs" / "llama-3.1-8b")


class PartFailed(RuntimeError):
    pass


def say(msg: str) -> None:
    print(f"[gpu_bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_flags(p)
    p.set_defaults(model_id=DEFAULT_MODEL, max_batch_size=256,
                   compilation_cache_dir=str(REPO / ".cache" / "jax-gpu-bench"))  # fmt: skip
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--num-prompts", type=int, default=1000, help="prompts per offline workload")
    p.add_argument("--workloads", default="256x256,1024x128", help="offline workloads, input x output tokens")
    p.add_argument("--hf-num-prompts", type=int, default=256, help="HF generate_batch prompts (0: skip HF)")
    p.add_argument("--single-input-len", type=int, default=128)
    p.add_argument("--single-output-len", type=int, default=256)
    p.add_argument("--single-runs", type=int, default=3, help="timed single-stream requests (median)")
    p.add_argument("--copy-mib", type=int, default=2048, help="array size of the copy-bandwidth probe")
    p.add_argument("--concurrency", default="1,16,64,256", help="serving concurrencies")
    p.add_argument("--client-processes", type=int, default=4,
                   help="most bench/serve.py processes at a level (one per 32 of concurrency)")
    p.add_argument("--serve-input-len", type=int, default=1024)
    p.add_argument("--serve-output-len", type=int, default=128)
    p.add_argument(
        "--serve-min-prompts", type=int, default=32, help="prompts per level: max(4 x concurrency, this)"
    )
    p.add_argument("--serve-start-timeout", type=float, default=1200.0)
    p.add_argument("--offline-json", type=Path, default=None,
                   help="an earlier --json-out whose offline figures the serving part compares with")  # fmt: skip
    p.add_argument("--trace-out", type=Path, default=None, help="where the profile part copies its traces")
    p.add_argument("--serve-profile-seconds", type=float, default=0.0,
                   help="serving: capture this long an engine trace (POST /admin/profile) at the top concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--worker", choices=("engine", "hf", "startup"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.random_weights = True  # always: the point is shapes nobody downloads
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = sorted(set(args.parts) - set(PARTS))
    if bad:
        p.error(f"unknown parts {bad}; choose from {', '.join(PARTS)}")
    args.hf_num_prompts = min(args.hf_num_prompts, args.num_prompts)
    return args


# ---- children ----------------------------------------------------------------------------------


def child(kind: str, extra: list[str] | None = None, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, *sys.argv[1:], *(extra or []), "--worker", kind, "--worker-out", out]
    try:
        rc = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
        if rc != 0:
            raise PartFailed(f"the {kind} child process exited with code {rc} (its output is above)")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path, n: int) -> str:
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines[-n:] if line.strip())


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    import httpx

    start = last = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise PartFailed(
                f"tgx serve exited with code {proc.returncode} before it was healthy:\n{_tail(log, 30)}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now - start > timeout:
            raise PartFailed(f"tgx serve was not healthy within {timeout:g} s:\n{_tail(log, 30)}")
        if now - last > 15:
            last = now
            say(f"serving: waiting for tgx serve ({now - start:.0f} s): {_tail(log, 1)[:150]}")
        time.sleep(1.0)


def _cpu_seconds(roots: list[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process under `roots`, keyed "pid name" (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    keep, frontier = set(roots), list(roots)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, _) in procs.items():
            if ppid == parent and pid not in keep:
                keep.add(pid)
                frontier.append(pid)
    return {f"{pid} {_short(procs[pid][2])}": procs[pid][1] for pid in sorted(keep) if pid in procs}


class _CpuSampler:
    """Samples the server's processes' CPU seconds twice a second on a thread; stop() gives each
    process's busiest 2-second stretch in cores (an average over a level hides a saturated burst)."""

    def __init__(self, root: int) -> None:
        self._root, self._samples, self._done = root, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.5):
            self._samples.append((time.monotonic(), _cpu_seconds([self._root])))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join()
        peak: dict[str, float] = {}
        for (t_a, a), (t_b, b) in zip(self._samples, self._samples[4:]):
            for k in a.keys() & b.keys():
                peak[k] = max(peak.get(k, 0.0), round((b[k] - a[k]) / (t_b - t_a), 2))
        return peak


def _short(cmd: str) -> str:
    for key in ("router", "engine.rpc.server", "serve.py", "engine.cli"):
        if key in cmd:
            return key
    return cmd[:40]


def serving(args: argparse.Namespace, report: dict) -> dict:
    from engine.launcher import _engine_argv

    probe = subprocess.run([sys.executable, "-c", "import litestar, uvicorn, msgspec, router.app"],
                           cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise PartFailed(f"the router cannot start here ({last}); install the project's dependencies")
    levels = [int(c) for c in args.concurrency.split(",")]
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "engine.cli", "serve", *_engine_argv(args), "--hostname", "127.0.0.1",
           "--port", url.rsplit(":", 1)[1], "--max-concurrent-requests", str(max(levels) + 16)]  # fmt: skip
    log = Path(tempfile.mkdtemp(prefix="tgx-gpu-bench-")) / "serve.log"
    say(f"serving: starting tgx serve, log in {log} (" + " ".join(cmd[3:]) + ")")
    # Same session as this script: if the device tool kills the run, tgx serve goes with it. Its
    # per-request access log would drown the progress lines: it goes to a file.
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    runs = []
    try:
        wait_healthy(proc, url, args.serve_start_timeout, log)
        import httpx

        warm = {"model": "tgx", "prompt": list(range(1000, 1016)), "max_tokens": 4, "ignore_eos": True}
        httpx.post(f"{url}/v1/completions", json=warm, timeout=600).raise_for_status()
        for c in levels:
            n = max(4 * c, args.serve_min_prompts)
            say(
                f"serving: concurrency {c}, {n} prompts of {args.serve_input_len} in / {args.serve_output_len} out"
            )
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            client = subprocess.Popen(
                [sys.executable, str(REPO / "bench" / "serve.py"), "--base-url", url, "--num-prompts", str(n),
                 "--concurrency", str(c), "--input-len", str(args.serve_input_len),
                 "--output-len", str(args.serve_output_len), "--seed", str(args.seed), "--json-out", str(out),
                 "--processes", str(min(args.client_processes, max(1, c // 32)))],
                cwd=REPO, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            t0, cpu0 = time.monotonic(), _cpu_seconds([proc.pid])
            child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            sampler = _CpuSampler(proc.pid)
            capture = None
            if args.serve_profile_seconds and c == levels[-1]:
                capture = _capture_profile(url, client, args.serve_profile_seconds, args.trace_out)
            rc = client.wait()
            # The client's CPU time, its worker processes included: the only child reaped in the level.
            child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall = time.monotonic() - t0
            cpu1 = _cpu_seconds([proc.pid])
            result = json.loads(out.read_text()) if out.stat().st_size else {"concurrency": c, "failed": n}
            # Cores each server process kept busy during the level, and the client's.
            result["cpu_cores"] = {k: round((cpu1[k] - v) / wall, 2) for k, v in cpu0.items() if k in cpu1}
            result["cpu_cores_peak_2s"] = sampler.stop()
            client_cpu = child1.ru_utime + child1.ru_stime - child0.ru_utime - child0.ru_stime
            result["cpu_cores"]["serve.py (client)"] = round(client_cpu / wall, 2)
            if capture:
                result["engine_trace"] = capture
            say(f"serving: concurrency {c}: CPU cores busy {result['cpu_cores']}, "
                f"busiest 2 s {result['cpu_cores_peak_2s']}")
            out.unlink()
            runs.append(result)
            if rc != 0:
                say(
                    f"serving: concurrency {c}: {result.get('failed')} requests failed {result.get('errors', '')}"
                )
    finally:
        proc.terminate()  # the launcher stops the router, then the engine
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    offline = report.get("offline") or (json.loads(args.offline_json.read_text()).get("offline")
                                         if args.offline_json else None)  # fmt: skip
    same = next((w for w in offline or [] if (w["input_len"], w["output_len"])
                 == (args.serve_input_len, args.serve_output_len)), None)  # fmt: skip
    top = runs[-1] if runs else {}
    return {
        "input_len": args.serve_input_len,
        "output_len": args.serve_output_len,
        "runs": runs,
        "offline_output_tokens_per_s": same and same["output_tokens_per_s"],
        "http_vs_offline": (top.get("output_throughput", 0) / same["output_tokens_per_s"]) if same else None,
    }


def _capture_profile(url: str, client: subprocess.Popen, seconds: float, trace_out: Path | None) -> dict | None:
    """Once the level is under way, an engine trace through POST /admin/profile, summarised."""
    import httpx
    import trace_summary

    time.sleep(min(20.0, seconds * 2))  # past the ramp-up: every slot busy
    if client.poll() is not None:
        return None
    try:
        r = httpx.post(f"{url}/admin/profile", json={"seconds": seconds}, timeout=seconds + 300)
        r.raise_for_status()
        path = r.json().get("perfetto_trace")
        summary = trace_summary.summarize(trace_summary.load(path))
        trace_summary.print_summary(f"tgx serve engine during the top concurrency ({seconds:g} s)", summary)
        if trace_out is not None:
            trace_out.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, trace_out / "serving.perfetto_trace.json.gz")
        return summary
    except Exception as e:  # noqa: BLE001 - the measurement goes on without its trace
        say(f"serving: profile capture failed: {e!r}")
        return None


def startup(args: argparse.Namespace) -> list[dict]:
    cache = tempfile.mkdtemp(prefix="tgx-gpu-bench-cache-")
    rows = []
    try:
        for label in ("cold", "warm"):
            say(f"startup: {label} engine start (compilation cache {cache})")
            t = time.perf_counter()
            r = child("startup", ["--compilation-cache-dir", cache])
            rows.append({"run": label, "process_s": time.perf_counter() - t, **r})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


# ---- tables ------------------------------------------------------------------------------------


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
        rows.append(["decode program", f"{prog['entry_ops']} ops at the top level, {prog['command_buffers']} "
                     f"command-buffer (CUDA graph) mentions, token bucket {prog['token_bucket']}"])
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


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    if args.worker:
        import gpu_bench_workers

        gpu_bench_workers.run_worker(args)
        return 0
    report: dict = {"argv": sys.argv[1:], "parts": args.parts}
    failed = []

    def save() -> None:
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    def part(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            fn()
            say(f"{name}: done in {time.perf_counter() - t:.0f} s")
        except Exception as e:  # noqa: BLE001 - one part failing is reported; the next part still runs
            if not isinstance(e, PartFailed):
                traceback.print_exc()
            failed.append(name)
            report.setdefault("errors", {})[name] = str(e)
            say(f"{name}: FAILED: {e}")
        save()

    def engine_parts() -> None:
        say(
            "engine: building the random-weight engine ("
            + ", ".join(p for p in args.parts if p in ("single", "offline", "profile"))
            + ")"
        )
        e = report["engine"] = child("engine")
        report["offline"] = e.get("offline")
        if "single" in args.parts:
            print_single(e)
        if "offline" in args.parts:
            hf = None
            if args.hf_num_prompts > 0:
                say(f"offline: HF transformers generate_batch on {args.hf_num_prompts} prompts, same weights")
                env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # leave the rest to torch
                try:
                    hf = report["hf"] = child("hf", env=env)
                except PartFailed as err:
                    hf = report["hf"] = {"error": str(err)}
                    failed.append("hf")
            print_offline(e, hf)

    if {"single", "offline", "profile"} & set(args.parts):
        part("engine", engine_parts)
    if "serving" in args.parts:
        part("serving", lambda: print_serving(report.setdefault("serving", serving(args, report))))
    if "startup" in args.parts:
        part("startup", lambda: print_startup(report.setdefault("startup", startup(args))))
    save()
    if failed:
        say(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
