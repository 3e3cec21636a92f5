"""Shared fixtures for engine tests: the real SmolLM2 model (ours and transformers'), engine factories.

Loading and compiling are the slow parts on CPU, so the loaded model is shared per session, the
GGUF files' metadata is parsed once per session (tests.support.shared_gguf_reads), and compiled
programs go to a persistent cache shared by every engine the tests build.
"""

from __future__ import annotations

import pytest

from tests.support import JAX_CACHE as CACHE_DIR
from tests.support import shared_gguf_reads, smollm2_gguf


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
    import jax

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shared_gguf_reads():
    with shared_gguf_reads():
        yield


@pytest.fixture(scope="session")
def smollm2_f32():
    from engine.models.loader import load_model

    return load_model(str(smollm2_gguf()), dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def make_engine(smollm2_f32):
    """Builds an LLMEngine over the shared float32 SmolLM2 with test-sized limits."""
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    def make(**overrides):
        cfg = dict(
            dtype="float32",
            max_batch_size=32,
            max_batch_prefill_tokens=256,
            max_total_tokens=512,
            max_batch_total_tokens=8192,
            max_top_n_tokens=3,
        )
        cfg.update(overrides)
        return LLMEngine(EngineConfig(**cfg), loaded=smollm2_f32)

    return make


@pytest.fixture(scope="session")
def engine(make_engine):
    return make_engine()


def run_all(engine, prompts, params):
    """Submits every prompt at once to an LLMEngine and returns each request's generated token ids."""
    from engine.sampling_params import SamplingParams

    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    engine.run_until_done(lambda out: tokens[out.request_id].extend(t.token_id for t in out.tokens))
    return [tokens[r.request_id] for r in reqs]
