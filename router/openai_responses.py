"""OpenAI response shapes: chat.completion(.chunk), text_completion and both logprobs layouts.

Owns: ids ("chatcmpl-"/"cmpl-" + random hex), finish_reason mapping to "stop"/"length", usage,
chat logprobs {content: [{token, logprob, bytes, top_logprobs}]} and completions logprobs
{tokens, token_logprobs, top_logprobs, text_offset}. Must not: run the engine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from engine.api import GeneratedToken, TokenLogprob
from router.openai_params import FINISH_REASON
from router.tokenizer import RouterTokenizer

SYSTEM_FINGERPRINT = "tgx-native"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(engine_reason: str | None) -> str:
    return FINISH_REASON.get(engine_reason or "length", "stop")


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(obj: str, rid: str, created: int, model: str, choices: list, **extra: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        **extra,
    }


def now() -> int:
    return int(time.time())


def _text(t: GeneratedToken | TokenLogprob, tok: RouterTokenizer) -> str:
    # GeneratedToken.text is "" while a multi-byte character is incomplete; show the token itself.
    return t.text or tok.decode_one(t.token_id)


def chat_logprobs(tokens: Sequence[GeneratedToken], tok: RouterTokenizer) -> list[dict[str, Any]]:
    out = []
    for t in tokens:
        s = _text(t, tok)
        out.append(
            {
                "token": s,
                "logprob": t.logprob,
                "bytes": list(s.encode("utf-8")),
                "top_logprobs": [
                    {"token": (a := _text(x, tok)), "logprob": x.logprob, "bytes": list(a.encode("utf-8"))}
                    for x in t.top
                ],
            }
        )
    return out


def completion_logprobs(
    tokens: Sequence[GeneratedToken], tok: RouterTokenizer, offset: int
) -> dict[str, Any]:
    toks, lps, tops, offsets = [], [], [], []
    for t in tokens:
        s = _text(t, tok)
        toks.append(s)
        lps.append(t.logprob)
        tops.append({_text(x, tok): x.logprob for x in t.top} if t.top else None)
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
