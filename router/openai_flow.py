"""OpenAI request flow shared by the chat and completions handlers.

Owns: choice fan-out (n, seeds), prompt preparation (chat template, completion prompt lists),
running the engine requests to completion, and the streaming loop that turns merged engine
outputs into OpenAI chunks (stop sequences trimmed, usage chunk, `data: [DONE]`, mid-stream
errors as an OpenAI error event). Must not: declare routes (router/controllers/openai.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from litestar import Response

from engine.sampling_params import SamplingParams
from router.errors import BadBatchError, InputValidationError, RouterError
from router.generation import collect_many, merge, prime, stream
from router.observe import Permit, RequestTracker, holding
from router.openai_params import StopTrimmer, chat_messages, check_chat_unsupported
from router.openai_responses import finish_reason, usage
from router.schemas.openai import ChatRequest, CompletionRequest
from router.services import Services, sse_event, sse_response

Job = tuple[Sequence[int], SamplingParams]


def fan_out(params: SamplingParams, n: int) -> list[SamplingParams]:
    if n > 1 and params.seed is None and not params.is_greedy:
        # Draw the base seed here so the n choices are guaranteed to sample differently.
        params = dataclasses.replace(params, seed=secrets.randbits(62))
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def chat_prepare(svc: Services, data: ChatRequest) -> tuple[str, list[int]]:
    check_chat_unsupported(data)
    prompt = svc.tokenizer.apply_chat_template(chat_messages(data.messages))
    return prompt, svc.tokenizer.encode(prompt, add_special_tokens=False)  # the template adds BOS


def completion_prompts(svc: Services, data: CompletionRequest) -> list[tuple[str, list[int]]]:
    if data.suffix:
        raise BadBatchError(
            "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported"
        )
    p = data.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [list(p)]
    elif all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
        items = list(p)
    else:
        raise InputValidationError(
            "`prompt` must be a string, a list of strings, or token id lists", param="prompt"
        )
    if not items:
        raise InputValidationError("`prompt` cannot be empty", param="prompt")
    if len(items) > svc.settings.max_client_batch_size:
        raise BadBatchError(
            f"Number of prompts exceeds the maximum allowed batch size of {svc.settings.max_client_batch_size}",
            "batch size exceeded",
        )
    out = []
    for it in items:
        if isinstance(it, str):
            if not it:
                raise InputValidationError("`inputs` cannot be empty", param="prompt")
            out.append((it, svc.tokenizer.encode(it)))
        else:
            if not it or any(not 0 <= t < svc.info.vocab_size for t in it):
                raise InputValidationError(
                    "token id prompts must be non-empty and within the vocabulary", param="prompt"
                )
            out.append((svc.tokenizer.hf.decode(it), list(it)))
    return out


async def run_all(svc: Services, tracker: RequestTracker, permit: Permit, jobs: list[Job]) -> list:
    with holding(tracker, permit):
        return await collect_many(svc.engine, jobs, tracker)


async def stream_chunks(
    svc: Services,
    tracker: RequestTracker,
    jobs: list[Job],
    merged: AsyncIterator,
    make_chunk,
    *,
    include_usage: bool,
    num_prompt_tokens: int,
    opening: list[bytes],
) -> AsyncIterator[bytes]:
    """Shared streaming loop; make_chunk(i, text, tokens, finish) -> chunk dict."""
    trimmers = [StopTrimmer(p.stop) for _, p in jobs]
    generated = [0] * len(jobs)
    try:
        for b in opening:
            yield b
        async for i, out in merged:
            text = trimmers[i].push(out.text, out.finished, out.stop_sequence)
            if text or out.tokens:
                yield sse_event(make_chunk(i, text, out.tokens, None))
            if out.finished:
                generated[i] = out.num_generated_tokens
                yield sse_event(make_chunk(i, None, (), finish_reason(out.finish_reason)))
        tracker.finish()
        if include_usage:
            yield sse_event(
                make_chunk(-1, None, (), None)
                | {"choices": [], "usage": usage(num_prompt_tokens, sum(generated))}
            )
        # huggingface_hub only recognises "data: [DONE]" (with the space); every SSE parser accepts it.
        yield b"data: [DONE]\n\n"
    except RouterError as e:
        tracker.fail(e.error_type, e.message)
        yield sse_event(
            {
                "error": {
                    "message": e.text,
                    "type": "invalid_request_error" if e.status_code < 500 else "server_error",
                    "param": e.param,
                    "code": e.error_type,
                }
            }
        )
    except (asyncio.CancelledError, GeneratorExit):
        tracker.fail("dropped")
        raise
    finally:
        await merged.aclose()


async def start_stream(
    svc: Services, tracker: RequestTracker, permit: Permit, jobs: list[Job], make_chunk, **kw: Any
) -> Response:
    with holding(tracker, permit, keep_on_success=True):
        merged = await prime(merge([stream(svc.engine, ids, p, tracker) for ids, p in jobs]))
    events = stream_chunks(svc, tracker, jobs, merged, make_chunk, **kw)
    return sse_response(events, permit.release, {}, source=merged)


