"""TGI-native routes: POST /generate, /generate_stream, / (compat) and /tokenize.

Owns: the request flow of TGI's handlers (permit first, then validation, then the engine) and the
wiring to TGI's response shapes. Must not: format JSON itself (router/tgi_responses.py) or talk to
the engine except through router/generation.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from router.auth import require_api_key
from router.controllers.misc import health_response
from router.errors import RouterError
from router.generation import Result, collect, collect_many, prime, stream
from router.observe import RequestTracker, holding
from router.schemas.tgi import CompatGenerateRequest, GenerateParameters, GenerateRequest, SimpleToken
from router.services import Services, sse_event, sse_response
from router.tgi_responses import generate_response, pick_best, timing_headers, token, top_token
from router.validation import Prepared, validate_generate


def _special_ids(svc: Services) -> frozenset[int]:
    return frozenset(svc.tokenizer.hf.all_special_ids)


async def run_generate(
    svc: Services, request: Request, inputs: str, p: GenerateParameters | None, name: str
) -> tuple[dict, dict[str, str]]:
    tracker, permit = svc.admit(request, name)
    with holding(tracker, permit):
        prep = validate_generate(p, inputs, svc.settings, svc.info, svc.tokenizer, stream=False)
        tracker.validated(len(prep.input_ids), prep.params.max_new_tokens)
        if prep.best_of > 1:
            seeds = {secrets.randbits(63) for _ in range(prep.best_of * 2)}  # distinct seeds per copy
            params = [dataclasses.replace(prep.params, seed=s) for s in list(seeds)[: prep.best_of]]
            results = await collect_many(svc.engine, [(prep.input_ids, q) for q in params], tracker)
        else:
            results = [await collect(svc.engine, prep.input_ids, prep.params, tracker)]
    t = tracker.finish()
    body = generate_response(
        results,
        inputs,
        details=prep.details,
        decoder_input_details=prep.decoder_input_details,
        sampling=prep.sampling,
        return_full_text=prep.return_full_text,
        special_ids=_special_ids(svc),
    )
    best = pick_best(results)
    n_gen = best.num_generated or len(best.tokens)
    headers = timing_headers(t, svc.settings.compute_type, inputs, len(prep.input_ids), n_gen)
    return body, headers


async def _events(
    svc: Services, outputs: AsyncIterator, prep: Prepared, inputs: str, tracker: RequestTracker
) -> AsyncIterator[bytes]:
    res = Result(seed=prep.params.seed)
    index = 0
    special = _special_ids(svc)
    try:
        async for out in outputs:
            res.add(out)
            toks = out.tokens or ((None,) if out.finished else ())
            for k, tok in enumerate(toks):
                index += 1
                ev: dict = {
                    "index": index,
                    "token": token(tok) if tok else {"id": 0, "text": "", "logprob": 0.0, "special": True},
                }
                if tok is not None and tok.top:
                    ev["top_tokens"] = [top_token(a, special) for a in tok.top]
                ev["generated_text"], ev["details"] = None, None
                if out.finished and k == len(toks) - 1:
                    ev["generated_text"] = (inputs if prep.return_full_text else "") + res.text
                    if prep.details:
                        ev["details"] = {
                            "finish_reason": res.finish_reason,
                            "generated_tokens": res.num_generated,
                            "seed": res.seed if prep.sampling else None,
                            "input_length": len(prep.input_ids),
                        }
                yield sse_event(ev)
            if out.finished:
                tracker.finish()
                return
        tracker.fail("incomplete")
        yield sse_event(
            {"error": "Incomplete generation stream", "error_type": "incomplete_generation_stream"}
        )
    except RouterError as e:
        tracker.fail(e.error_type, e.message)
        yield sse_event({"error": e.text, "error_type": e.error_type})
    except (asyncio.CancelledError, GeneratorExit):
        tracker.fail("dropped")
        raise
    finally:
        await outputs.aclose()


async def start_stream(
    svc: Services, request: Request, inputs: str, p: GenerateParameters | None
) -> Response:
    tracker, permit = svc.admit(request, "generate_stream")
    with holding(tracker, permit, keep_on_success=True):
        prep = validate_generate(p, inputs, svc.settings, svc.info, svc.tokenizer, stream=True)
        tracker.validated(len(prep.input_ids), prep.params.max_new_tokens)
        outputs = await prime(stream(svc.engine, prep.input_ids, prep.params, tracker))
    headers = {"x-compute-type": svc.settings.compute_type, "x-compute-characters": str(len(inputs))}
    return sse_response(_events(svc, outputs, prep, inputs, tracker), permit.release, headers, source=outputs)


class TGIController(Controller):
    tags = ("Text Generation Inference",)

    # GET / lives here, not in MiscController: Litestar refuses one path in two controllers.
    @get("/", operation_id="health_root")
    async def root_health(self, svc: NamedDependency[Services]) -> Response:
        """Health check (TGI also answers it on GET /)."""
        return await health_response(svc)

    @post("/generate", operation_id="generate", status_code=200, before_request=require_api_key)
    async def generate(
        self, data: JSONBody[GenerateRequest], request: Request, svc: NamedDependency[Services]
    ) -> Response:
        """Generate tokens."""
        body, headers = await run_generate(svc, request, data.inputs, data.parameters, "generate")
        return Response(body, headers=headers)

    @post("/generate_stream", operation_id="generate_stream", status_code=200, before_request=require_api_key)
    async def generate_stream(
        self, data: JSONBody[GenerateRequest], request: Request, svc: NamedDependency[Services]
    ) -> Response:
        """Generate a stream of tokens as server-sent events."""
        return await start_stream(svc, request, data.inputs, data.parameters)

    @post("/", operation_id="compat_generate", status_code=200, before_request=require_api_key)
    async def compat_generate(
        self, data: JSONBody[CompatGenerateRequest], request: Request, svc: NamedDependency[Services]
    ) -> Response:
        """TGI's compat route: `stream` picks /generate_stream, else a one-element array."""
        if data.stream:
            return await start_stream(svc, request, data.inputs, data.parameters)
        # TGI defaults return_full_text here from the Hub pipeline tag, and to true without one
        # (our case: the model is served from a local directory).
        p = data.parameters or GenerateParameters(do_sample=True)
        if p.return_full_text is None:
            p = msgspec.structs.replace(p, return_full_text=True)
        body, headers = await run_generate(svc, request, data.inputs, p, "compat_generate")
        return Response([body], headers=headers)

    @post("/tokenize", operation_id="tokenize", status_code=200, before_request=require_api_key)
    async def tokenize(
        self, data: JSONBody[GenerateRequest], svc: NamedDependency[Services]
    ) -> list[SimpleToken]:
        """Tokenize inputs (byte offsets into `inputs`)."""
        return [
            SimpleToken(id=i, text=t, start=s, stop=e)
            for i, t, s, e in svc.tokenizer.tokens_with_offsets(data.inputs)
        ]
