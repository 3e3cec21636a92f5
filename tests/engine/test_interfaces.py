"""The public interfaces over the engine: the async streaming API, the blocking LLM API and `tgx generate`."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.async_engine import AsyncEngine
from engine.sampling_params import SamplingParams
from tests.engine.conftest import run_all
from tests.support import JAX_CACHE, smollm2_gguf


def test_async_streaming_matches_blocking_and_cancel_frees_pages(engine):
    eng = engine  # the session's: an engine of its own would compile ~40 programs for this one test
    prompt = eng.tokenizer("The three laws of robotics are")["input_ids"]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    blocking = run_all(eng, [prompt], params)[0]
    aeng = AsyncEngine(eng)

    async def stream() -> tuple[list[int], str]:
        ids, text = [], ""
        async for out in aeng.generate(prompt, params):
            ids.extend(t.token_id for t in out.tokens)
            text += out.text
        return ids, text

    async def cancel_midway() -> int:
        seen = 0
        gen = aeng.generate(prompt, SamplingParams(max_new_tokens=200, ignore_eos=True))
        async for _ in gen:
            seen += 1
            if seen == 3:
                break
        await gen.aclose()
        return seen

    async def bad_request() -> None:
        async for _ in aeng.generate(prompt, SamplingParams(max_new_tokens=10_000)):
            pass

    try:
        ids, text = asyncio.run(stream())
        assert ids == blocking
        assert text == eng.tokenizer.decode(blocking, skip_special_tokens=True)
        assert asyncio.run(cancel_midway()) == 3
        deadline = time.monotonic() + 10
        while not eng.kv_groups.is_full_free() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.kv_groups.is_full_free()
        with pytest.raises(ValueError, match="max_new_tokens"):
            asyncio.run(bad_request())
        assert aeng.is_healthy
    finally:
        aeng.shutdown()


def test_cli_generate_streams_text(capsys):
    from engine.cli import main

    rc = main(
        [
            "generate",
            "--model-id", str(smollm2_gguf()),
            "--dtype", "float32",
            "--max-total-tokens", "128",
            "--max-batch-prefill-tokens", "64",
            "--max-top-n-tokens", "0",
            "--compilation-cache-dir", str(JAX_CACHE),
            "--max-new-tokens", "8",
            "--chat",
            "What is the capital of France?",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    assert "Paris" in out.out
    assert "compil" in out.err  # progress is shown while compiling


def test_cli_rejects_bad_dtype(capsys):
    from engine.cli import main

    assert main(["generate", "--dtype", "int3", "hi"]) == 2
    assert "unsupported --dtype" in capsys.readouterr().err
