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
from gpu_bench_tables import print_offline, print_serving, print_single, print_startup  # noqa: E402 (bench/)

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
    p.add_argument("--lone-decode-bucket", choices=("auto", "on", "off"), default="auto",
                   help="the engine's 1-token bucket for a request decoding alone (auto: on GPUs)")
    p.add_argument("--fuse-projections", choices=("auto", "on", "off"), default="auto",
                   help="q/k/v and gate/up as one matrix each (auto: on one GPU)")
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
        copy_to = trace_out / "serving.perfetto_trace.json.gz" if trace_out is not None else None
        title = f"tgx serve engine during the top concurrency ({seconds:g} s)"
        return trace_summary.report(r.json().get("perfetto_trace"), title, copy_to)
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
