"""OpenAI wire schemas: request bodies of /v1/chat/completions and /v1/completions.

Owns: msgspec Structs for the fields OpenAI documents (unknown fields are ignored, as OpenAI and
TGI do). Must not: encode semantics; router/openai_params.py turns these into SamplingParams.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by chat and legacy completions."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None  # TGI extension
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: fixed-length outputs for benchmarks (bench/serve.py)


class ChatRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # str, [str], [int] or [[int]]; msgspec allows one array type per union, so the list's items
    # are a union and router/openai_params.py checks the list is homogeneous.
    prompt: str | list[str | int | list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
