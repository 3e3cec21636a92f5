"""OpenAI-compatible routes: POST /v1/chat/completions, /v1/completions and TGI's /chat_tokenize.

Owns: the handlers (permit, validation, N engine requests per call, response assembly). Must not:
hold the shared flow (router/openai_flow.py), format single objects (router/openai_responses.py)
or interpret OpenAI fields (router/openai_params.py).
"""

from __future__ import annotations

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from router.auth import require_api_key
from router.errors import InputValidationError
from router.observe import holding
from router.openai_flow import Job, chat_prepare, completion_prompts, fan_out, run_all, start_stream
from router.openai_params import StopTrimmer, build_params
from router.openai_responses import (
    chat_logprobs,
    completion_logprobs,
    envelope,
    finish_reason,
    new_id,
    now,
    usage,
)
from router.schemas.openai import ChatRequest, CompletionRequest
from router.services import Services, sse_event


class OpenAIController(Controller):
    tags = ("OpenAI",)

    @post(
        "/v1/chat/completions",
        operation_id="chat_completions",
        status_code=200,
        before_request=require_api_key,
    )
    async def chat_completions(
        self, data: JSONBody[ChatRequest], request: Request, svc: NamedDependency[Services]
    ) -> Response:
        """OpenAI chat completions (streamed as server-sent events when `stream` is true)."""
        tracker, permit = svc.admit(request, "chat_completions")
        with holding(tracker, permit, keep_on_success=True):  # validation; the run frees it
            _, ids = chat_prepare(svc, data)
            if data.top_logprobs and not data.logprobs:
                raise InputValidationError(
                    "`logprobs` must be true when `top_logprobs` is set", param="top_logprobs"
                )
            max_tokens = (
                data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
            )
            params, n = build_params(
                data,
                num_input=len(ids),
                max_tokens=max_tokens,
                top_n=data.top_logprobs or 0,
                settings=svc.settings,
                info=svc.info,
            )
            tracker.validated(len(ids), params.max_new_tokens)
        jobs: list[Job] = [(ids, p) for p in fan_out(params, n)]
        rid, created, model = new_id("chatcmpl"), now(), data.model or svc.info.model_id
        want_lp = bool(data.logprobs)
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)

            def chunk(i: int, text: str | None, tokens, finish: str | None) -> dict:
                delta = {} if text is None else {"content": text}
                lp = (
                    {"content": chat_logprobs(tokens, svc.tokenizer), "refusal": None}
                    if want_lp and tokens
                    else None
                )
                choices = [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]
                extra = {"usage": None} if include_usage else {}
                return envelope("chat.completion.chunk", rid, created, model, choices, **extra)

            opening = [
                sse_event(
                    chunk(i, None, (), None)
                    | {
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    }
                )
                for i in range(n)
            ]
            return await start_stream(
                svc,
                tracker,
                permit,
                jobs,
                chunk,
                include_usage=include_usage,
                num_prompt_tokens=len(ids),
                opening=opening,
            )
        results = await run_all(svc, tracker, permit, jobs)
        tracker.finish()
        choices = []
        for i, r in enumerate(results):
            lp = {"content": chat_logprobs(r.tokens, svc.tokenizer), "refusal": None} if want_lp else None
            text = StopTrimmer(()).final_text(r.text, r.stop_sequence)
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": finish_reason(r.finish_reason),
                }
            )
        body = envelope(
            "chat.completion",
            rid,
            created,
            model,
            choices,
            usage=usage(len(ids), sum(r.num_generated for r in results)),
        )
        return Response(body)

    @post("/v1/completions", operation_id="completions", status_code=200, before_request=require_api_key)
    async def completions(
        self, data: JSONBody[CompletionRequest], request: Request, svc: NamedDependency[Services]
    ) -> Response:
        """OpenAI legacy completions; `prompt` may be a list of up to --max-client-batch-size prompts."""
        tracker, permit = svc.admit(request, "completions")
        with holding(tracker, permit, keep_on_success=True):  # validation; the run frees it
            prompts = completion_prompts(svc, data)
            top_n = data.logprobs or 0
            if data.echo and data.logprobs is not None:
                raise InputValidationError("`echo` together with `logprobs` is not supported", param="echo")
            jobs: list[Job] = []
            n = 1
            for _, ids in prompts:
                params, n = build_params(
                    data,
                    num_input=len(ids),
                    max_tokens=data.max_tokens,
                    top_n=top_n,
                    settings=svc.settings,
                    info=svc.info,
                )
                jobs += [(ids, p) for p in fan_out(params, n)]
            if data.best_of is not None and data.best_of != n:
                raise InputValidationError(
                    "`best_of` is not supported on /v1/completions (use n)", param="best_of"
                )
            num_prompt = sum(len(ids) for _, ids in prompts)
            tracker.validated(num_prompt, jobs[0][1].max_new_tokens)
        rid, created, model = new_id("cmpl"), now(), data.model or svc.info.model_id
        want_lp = data.logprobs is not None
        echo = [prompts[i // n][0] if data.echo else "" for i in range(len(jobs))]
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            offsets = [len(e) for e in echo]

            def chunk(i: int, text: str | None, tokens, finish: str | None) -> dict:
                lp = None
                if want_lp and tokens:
                    lp = completion_logprobs(tokens, svc.tokenizer, offsets[i])
                    offsets[i] += sum(len(t.text) for t in tokens)
                choices = [{"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}]
                return envelope(
                    "text_completion",
                    rid,
                    created,
                    model,
                    choices,
                    **({"usage": None} if include_usage else {}),
                )

            opening = [sse_event(chunk(i, echo[i], (), None)) for i in range(len(jobs)) if echo[i]]
            return await start_stream(
                svc,
                tracker,
                permit,
                jobs,
                chunk,
                include_usage=include_usage,
                num_prompt_tokens=num_prompt,
                opening=opening,
            )
        results = await run_all(svc, tracker, permit, jobs)
        tracker.finish()
        choices = []
        for i, r in enumerate(results):
            lp = completion_logprobs(r.tokens, svc.tokenizer, len(echo[i])) if want_lp else None
            text = echo[i] + StopTrimmer(()).final_text(r.text, r.stop_sequence)
            choices.append(
                {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(r.finish_reason)}
            )
        body = envelope(
            "text_completion",
            rid,
            created,
            model,
            choices,
            usage=usage(num_prompt, sum(r.num_generated for r in results)),
        )
        return Response(body)

    @post("/chat_tokenize", operation_id="chat_tokenize", status_code=200)
    async def chat_tokenize(self, data: JSONBody[ChatRequest], svc: NamedDependency[Services]) -> dict:
        """Render the chat template and tokenize it (TGI extension)."""
        prompt, _ = chat_prepare(svc, data)
        toks = svc.tokenizer.tokens_with_offsets(prompt, add_special_tokens=False)  # as generated
        return {
            "tokenize_response": [{"id": i, "text": t, "start": s, "stop": e} for i, t, s, e in toks],
            "templated_text": prompt,
        }
