"""Official clients against a real uvicorn server: the `openai` SDK and huggingface_hub.

The lead runs the same tests against a real `tgx serve` by pointing TGX_BASE_URL at it.
"""

from __future__ import annotations

import asyncio
import os

import openai
import pytest
from huggingface_hub import InferenceClient


@pytest.fixture(scope="module")
def base_url(live_server):
    return os.environ.get("TGX_BASE_URL") or live_server[0]


MSG = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(autouse=True)
def _hub_online_for_localhost(monkeypatch):
    # tests/conftest.py sets HF_HUB_OFFLINE=1, which makes huggingface_hub refuse even 127.0.0.1.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)


def test_openai_sync_chat_and_completions(base_url):
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="-")
    r = c.chat.completions.create(
        model="tgi", messages=MSG, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    assert r.id.startswith("chatcmpl-") and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content and r.usage.completion_tokens <= 5
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    r = c.completions.create(model="tgi", prompt="Hello", max_tokens=4, n=2, seed=3)
    assert len(r.choices) == 2 and r.id.startswith("cmpl-")
    assert [m.id for m in c.models.list().data]


def test_openai_async_and_streaming(base_url):
    async def go():
        c = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="-")
        r = await c.chat.completions.create(model="tgi", messages=MSG, max_completion_tokens=3)
        assert r.choices[0].message.role == "assistant"
        stream = await c.chat.completions.create(
            model="tgi", messages=MSG, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        assert text and finish in ("stop", "length") and usage.completion_tokens <= 6
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="tgi", messages=MSG, top_p=0)

    asyncio.run(go())


def test_openai_sync_streaming_completions(base_url):
    c = openai.OpenAI(base_url=f"{base_url}/v1", api_key="-")
    pieces = [
        ch.choices[0].text
        for ch in c.completions.create(model="tgi", prompt="Hi", max_tokens=4, stream=True)
        if ch.choices
    ]
    assert "".join(pieces)


def test_hf_text_generation_with_details(base_url):
    c = InferenceClient(base_url=base_url)
    out = c.text_generation(
        "Hello", max_new_tokens=4, details=True, decoder_input_details=False, return_full_text=False
    )
    assert out.generated_text and out.details.generated_tokens <= 4
    assert out.details.finish_reason in ("length", "eos_token", "stop_sequence")
    tokens = list(c.text_generation("Hello", max_new_tokens=3, stream=True, details=True))
    assert tokens[-1].generated_text is not None and tokens[0].token.id >= 0


def test_hf_chat_completion_streaming(base_url):
    c = InferenceClient(base_url=base_url)
    text = ""
    for chunk in c.chat_completion(messages=MSG, max_tokens=5, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert text
    r = c.chat_completion(messages=MSG, max_tokens=3)
    assert r.choices[0].message.content
