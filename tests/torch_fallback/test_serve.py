"""`tgx serve` end to end on architectures without a Flax port (torch fallback), and the start-up refusal."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import httpx
import pytest
import torch

from tests.e2e.conftest import _free_port, metric
from tests.support import REPO
from tests.torch_fallback.conftest import running_serves, serve_command
from tests.torch_fallback.models import write_quantized_config

ARCHITECTURES = ["GPTNeoXForCausalLM", "GPT2LMHeadModel"]


@pytest.fixture(scope="module")
def servers(tiny_dirs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    flags = ("--max-batch-size", "8", "--max-total-tokens", "1024", "--max-batch-total-tokens", "4096")
    with running_serves({arch: tiny_dirs(arch) for arch in ARCHITECTURES}, logs, *flags) as urls:
        yield {arch: (url, logs / f"{arch}.log") for arch, url in urls.items()}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def served(request, servers, tiny_dirs):
    """(base URL, the same model loaded by transformers in this process, log path)."""
    import transformers

    url, log = servers[request.param]
    model = getattr(transformers, request.param).from_pretrained(
        tiny_dirs(request.param), dtype=torch.float32
    )
    return url, model.eval(), log


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


def _tokenize(url: str, text: str) -> list[int]:
    resp = httpx.post(f"{url}/tokenize", json={"inputs": text}, timeout=30)
    assert resp.status_code == 200, resp.text
    return [t["id"] for t in resp.json()]


def test_route_is_logged(served):
    _, model, log = served
    arch = type(model).__name__
    assert f"architecture {arch} -> torch path (no Flax port for {arch})" in log.read_text()


def test_generate_and_stream_give_transformers_greedy_tokens(served):
    url, model, _ = served
    words = ["alpha", "river", "stone", "quiet", "orbit", "lantern", "seven", "maple"]
    prompt = " ".join(random.choices(words, k=random.randint(3, 12)))
    n = random.randint(6, 16)
    params = {"max_new_tokens": n, "details": True, "decoder_input_details": False}
    want = _greedy(model, _tokenize(url, prompt), n)
    resp = httpx.post(f"{url}/generate", json={"inputs": prompt, "parameters": params}, timeout=60)
    assert resp.status_code == 200, resp.text
    details = resp.json()["details"]
    assert [t["id"] for t in details["tokens"]] == want
    assert details["finish_reason"] == "length" and details["generated_tokens"] == n
    events = []
    with httpx.stream(
        "POST", f"{url}/generate_stream", json={"inputs": prompt, "parameters": params}, timeout=60
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == want
    assert events[-1]["generated_text"] == resp.json()["generated_text"]


def test_unsupported_parameter_is_a_clear_400(served):
    url, _, _ = served
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2, "decoder_input_details": True}}
    resp = httpx.post(f"{url}/generate", json=body, timeout=30)
    assert resp.status_code in (400, 422), resp.text
    assert "not supported" in resp.text and "torch fallback path" in resp.text


def test_client_disconnect_cancels_the_request(served):
    url, _, _ = served
    start = time.monotonic()
    body = {"inputs": "tell me a story", "parameters": {"max_new_tokens": 40, "details": True}}
    resp = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    # An overestimate of a token's time: it includes the request's overheads.
    per_token = (time.monotonic() - start) / resp.json()["details"]["generated_tokens"]
    body = {"inputs": "tell me a long story", "parameters": {"max_new_tokens": 1000}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break  # leaving the block disconnects mid-generation
    left = time.monotonic()
    while time.monotonic() < left + 30 and metric(url, "tgi_batch_current_size") != 0:
        time.sleep(0.05)
    took = time.monotonic() - left
    assert metric(url, "tgi_batch_current_size") == 0 and metric(url, "tgx_kv_cache_usage") == 0
    # Generating the ~999 tokens left would take far longer: the request was cancelled, not completed.
    assert took < 999 * per_token / 4, (took, per_token)


def test_gptq_model_is_refused_at_start_up_without_cuda(tmp_path):
    model_dir = write_quantized_config(tmp_path / "gptq-model", "gptq")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}  # no CUDA, even on a GPU runner
    proc = subprocess.run(
        serve_command(model_dir, _free_port()),
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("tgx: error: the model's weights are GPTQ-quantized")
    assert "torch.cuda.is_available() is false" in lines[0] and "Traceback" not in lines[0]
