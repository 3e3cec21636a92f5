"""Two `tgx serve` processes x 4 CPU devices, joined by jax.distributed on localhost, serve HTTP as
one engine, and fail loudly together.

Owns: the whole multi-host path through the launcher: process 0 schedules, broadcasts each step and
serves HTTP; process 1 only follows (no router, no port); 2 replicas x 4 shards over the 8 global
devices give the greedy tokens of a one-device engine in this process; killing process 1 mid-stream
ends the in-flight request with an error and turns /health to 503 within seconds. Must not: leave
processes behind (each is its own process group, killed at the end) or depend on tight timing
(margins are several seconds).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.sharding import harness as H
from tests.support import JAX_CACHE, REPO

SEED = int(np.random.SeedSequence().entropy % 2**31)
NEW_TOKENS = 6
# Prefill 60 + 4 decodes fill a step of 64: token buckets 16, 32, 64 (prefill 64 would add a 68 to compile).
ENGINE_FLAGS = ["--dtype", "float32", "--max-batch-size", "4", "--max-total-tokens", "128",
                "--max-batch-prefill-tokens", "60", "--max-batch-total-tokens", "512", "--page-size", "4",
                "--max-top-n-tokens", "0", "--disable-prefill-logprobs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(model_dir) -> list[str]:
    """Texts of random tokens: the router and the in-process engine tokenize them alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = np.random.default_rng(SEED)
    return [tok.decode(rng.integers(3, H.HF_VOCAB, n).tolist()) for n in (11, 5, 17, 9)]


def _one_process_tokens(model_dir, prompts: list[str]) -> list[list[int]]:
    cfg = EngineConfig(model_id=str(model_dir), dtype="float32", max_batch_size=4, max_total_tokens=128,
                       max_batch_prefill_tokens=60, max_batch_total_tokens=512, page_size=4, max_top_n_tokens=0,
                       enable_prefill_logprobs=False)
    engine = LLMEngine(cfg)
    params = SamplingParams(max_new_tokens=NEW_TOKENS)  # TGI's /generate stops at EOS: so does this
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
        out[str(i)] = []
    engine.run_until_done(lambda o: out[o.request_id].extend(t.token_id for t in o.tokens))
    return [out[str(i)] for i in range(len(out))]


class Cluster:
    """Both hosts' `tgx serve`; process 0's HTTP port is `url`."""

    def __init__(self, model_dir, logs) -> None:
        coordinator, port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.logs = [logs / f"host{i}.log" for i in range(2)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.procs = []
        for pid in range(2):
            cmd = [sys.executable, "-m", "engine.cli", "serve", "--model-id", str(model_dir), *ENGINE_FLAGS,
                   "--num-shard", "4", "--data-parallel-size", "2",
                   "--coordinator-address", f"127.0.0.1:{coordinator}", "--num-processes", "2",
                   "--process-id", str(pid), "--distributed-heartbeat-timeout", "10", "--step-timeout", "20",
                   "--hostname", "127.0.0.1", "--port", str(port if pid == 0 else _free_port()),
                   "--compilation-cache-dir", str(JAX_CACHE)]
            with open(self.logs[pid], "w") as log:
                self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                                   start_new_session=True))

    def log(self, pid: int) -> str:
        return self.logs[pid].read_text()

    def wait_healthy(self, timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for pid, proc in enumerate(self.procs):
                assert proc.poll() is None, f"host {pid} exited {proc.returncode}:\n{self.log(pid)[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not healthy:\n{self.log(0)[-2000:]}\n{self.log(1)[-2000:]}"
            time.sleep(0.5)

    def kill(self, pid: int) -> None:
        try:
            os.killpg(self.procs[pid].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.procs[pid].wait()

    def close(self) -> None:
        for pid in range(2):
            self.kill(pid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    print(f"seed {SEED}")
    model_dir = H.save_hf_checkpoint(tmp_path_factory.mktemp("mh-llama"), SEED)
    prompts = _prompts(model_dir)
    c = Cluster(model_dir, tmp_path_factory.mktemp("mh-logs"))  # starts while the reference runs
    try:
        reference = _one_process_tokens(model_dir, prompts)
        c.wait_healthy()
        yield c, prompts, reference
    finally:
        c.close()


def test_two_hosts_serve_the_tokens_of_one(cluster):
    c, prompts, reference = cluster
    # Process 1 follows: it serves no HTTP, and says so.
    deadline = time.monotonic() + 30
    while "follows process 0's steps" not in c.log(1):
        assert time.monotonic() < deadline, c.log(1)[-2000:]
        time.sleep(0.2)
    assert "mesh: data=2 x model=4 over 8 cpu devices on 2 hosts" in c.log(0)
    assert "kv heads: 2 replicated to 4" in c.log(0)

    def generate(prompt):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
        r = httpx.post(f"{c.url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["details"]["tokens"]]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:  # together, so both replicas run at once
        got = list(pool.map(generate, prompts))
    assert got == reference, f"seed {SEED}"


def test_a_dead_host_fails_requests_and_health(cluster):
    c, prompts, _ = cluster
    # OpenAI completions take ignore_eos: the stream is sure to be running when process 1 dies.
    body = {"model": "tgx", "prompt": prompts[0], "max_tokens": 100, "ignore_eos": True, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for line in lines:  # a few tokens in, the request is mid-flight
            if line.startswith("data:"):
                events.append(line)
                if len(events) == 3:
                    break
        killed = time.monotonic()
        c.kill(1)
        try:
            for line in lines:
                if line.startswith("data:") and "[DONE]" not in line:
                    events.append(line)
        except httpx.HTTPError:
            pass  # a broken stream is an error too
    last = json.loads(events[-1][5:])
    assert len(events) < 101 and last.get("error"), f"the stream ended without an error: {events[-1]}"
    assert time.monotonic() - killed < 20
    # /health says unhealthy (503) within seconds, before the port closes.
    deadline = time.monotonic() + 20
    status = None
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{c.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            status = None
        if status == 503:
            break
        time.sleep(0.2)
    assert status == 503, f"/health answered {status}:\n{c.log(0)[-3000:]}"
    assert c.procs[0].wait(60) != 0  # and then `tgx serve` on process 0 exits, loudly
