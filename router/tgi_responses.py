"""TGI response shapes: GenerateResponse, details, SSE StreamResponse events and timing headers.

Owns: turning router Results and engine outputs into TGI's JSON exactly (a NaN first prefill
logprob becomes null, top_tokens omitted when empty, best_of_sequences only with best_of > 1).
Must not: run anything on the engine.
"""

from __future__ import annotations

import math
from typing import Any

from engine.api import GeneratedToken, TokenLogprob
from router.generation import Result


def token(t: GeneratedToken) -> dict[str, Any]:
    return {"id": t.token_id, "text": t.text, "logprob": t.logprob, "special": t.is_special}


def top_token(t: TokenLogprob, special_ids: frozenset[int]) -> dict[str, Any]:
    return {"id": t.token_id, "text": t.text, "logprob": t.logprob, "special": t.token_id in special_ids}


def prefill(tokens: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    return [
        {"id": t.token_id, "text": t.text, "logprob": None if not math.isfinite(t.logprob) else t.logprob}
        for t in tokens
    ]


def sequence_details(
    res: Result, sampling: bool, with_prefill: bool, special_ids: frozenset[int]
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "finish_reason": res.finish_reason,
        "generated_tokens": res.num_generated or len(res.tokens),
        "seed": res.seed if sampling else None,
        "prefill": prefill(res.prompt_tokens) if with_prefill else [],
        "tokens": [token(t) for t in res.tokens],
    }
    tops = [[top_token(a, special_ids) for a in t.top] for t in res.tokens]
    if any(tops):
        d["top_tokens"] = tops
    return d


def pick_best(results: list[Result]) -> Result:
    """best_of: the sequence with the highest mean token logprob (TGI's rule)."""
    return max(results, key=lambda r: r.mean_logprob) if len(results) > 1 else results[0]


def generate_response(
    results: list[Result],
    prompt: str,
    *,
    details: bool,
    decoder_input_details: bool,
    sampling: bool,
    return_full_text: bool,
    special_ids: frozenset[int],
) -> dict[str, Any]:
    best = pick_best(results)
    prefix = prompt if return_full_text else ""
    body: dict[str, Any] = {"generated_text": prefix + best.text}
    if details or decoder_input_details:
        d = sequence_details(best, sampling, decoder_input_details, special_ids)
        if len(results) > 1:
            others = []
            for r in results:
                if r is best:
                    continue
                seq = sequence_details(r, sampling, decoder_input_details, special_ids)
                others.append({"generated_text": prefix + r.text, **seq})
            d["best_of_sequences"] = others
        body["details"] = d
    return body


def timing_headers(
    t: dict[str, float], compute_type: str, inputs: str, n_prompt: int, n_gen: int
) -> dict[str, str]:
    ms = lambda s: str(int(s * 1000))
    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{t['total']:.6f}",
        "x-compute-characters": str(len(inputs)),
        "x-total-time": ms(t["total"]),
        "x-validation-time": ms(t["validation"]),
        "x-queue-time": ms(t["queue"]),
        "x-inference-time": ms(t["inference"]),
        "x-time-per-token": ms(t["per_token"]),
        "x-prompt-tokens": str(n_prompt),
        "x-generated-tokens": str(n_gen),
    }
