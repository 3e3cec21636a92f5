"""OpenAI request semantics: fields -> SamplingParams, chat messages -> prompt, and stop handling.

Owns: OpenAI's rules (temperature 0 = greedy, top_p in (0, 1], max_completion_tokens over
max_tokens, string-keyed logit_bias, n, top_logprobs) on top of TGI's token-limit checks, the
422/400s for features this server does not implement (tools, response_format, ...), and
StopTrimmer, which strips a matched stop sequence and withholds streamed text that could be the
start of one. Must not: run the engine or format responses.
"""

from __future__ import annotations

from typing import Any

from engine.api import EngineInfo
from engine.sampling_params import SamplingParams
from router.errors import InputValidationError as Invalid
from router.schemas.openai import ChatMessage, ChatRequest, SamplingFields
from router.settings import RouterSettings
from router.validation import check_lengths, make_params

FINISH_REASON = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "stop"}


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m.tool_calls or m.role == "tool":
            raise Invalid("tool calls are not supported by this server", param="messages")
        if isinstance(m.content, list):
            parts = []
            for c in m.content:
                if c.type == "text":
                    parts.append(c.text or "")
                elif c.type == "image_url":  # TGI hands text models the image as markdown
                    parts.append(f"![]({(c.image_url or {}).get('url', '')})")
                else:
                    raise Invalid(f"content part type `{c.type}` is not supported", param="messages")
            content = "".join(parts)
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    if not out:
        raise Invalid("`messages` cannot be empty", param="messages")
    return out


def check_chat_unsupported(req: ChatRequest) -> None:
    if req.tools and req.tool_choice != "none":
        raise Invalid("`tools` are not supported by this server", param="tools")
    if req.response_format is not None and req.response_format.get("type") not in (None, "text"):
        raise Invalid(
            "`response_format` other than text is not supported by this server", param="response_format"
        )


def stop_list(stop: str | list[str] | None, settings: RouterSettings) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > settings.max_stop_sequences:
        raise Invalid(
            f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stops)}",
            param="stop",
        )
    if any(not s for s in stops):
        raise Invalid("stop sequences must be non-empty strings", param="stop")
    return stops


def build_params(
    req: SamplingFields,
    *,
    num_input: int,
    max_tokens: int | None,
    top_n: int,
    settings: RouterSettings,
    info: EngineInfo,
) -> tuple[SamplingParams, int]:
    """Returns (params for choice 0, n). Choice i runs with seed + i so choices differ yet replay."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= settings.max_n:
        raise Invalid(f"`n` must be >= 1 and <= {settings.max_n}. Given: {n}", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise Invalid("`max_tokens` must be strictly positive", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise Invalid("`temperature` must be >= 0 and <= 2", param="temperature")
    max_top_n = min(settings.max_top_n_tokens, info.max_top_n_tokens)
    if not 0 <= top_n <= max_top_n:
        raise Invalid(f"`top_logprobs` must be >= 0 and <= {max_top_n}. Given: {top_n}", param="top_logprobs")
    bias = []
    for k, v in (req.logit_bias or {}).items():
        try:
            tid = int(k)
        except ValueError:
            tid = -1
        if not 0 <= tid < info.vocab_size:
            raise Invalid(
                f"`logit_bias` key {k!r} is not a token id in [0, {info.vocab_size})", param="logit_bias"
            )
        bias.append((tid, float(v)))
    if req.seed is not None and not 0 <= req.seed < 2**63 - settings.max_n:
        raise Invalid("`seed` must be a non-negative 64-bit integer", param="seed")
    max_new = check_lengths(num_input, max_tokens, info)
    params = make_params(
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=stop_list(req.stop, settings),
        top_n_tokens=top_n,
        logit_bias=tuple(bias),
        ignore_eos=req.ignore_eos,
    )
    return params, n


class StopTrimmer:
    """Streams text minus a trailing stop sequence; the engine's text includes the stop string."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.text = ""
        self.sent = 0

    def _holdback(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop sequence.
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, new: str, finished: bool, stop_sequence: str | None) -> str:
        self.text += new
        if finished:
            end = len(self.text)
            if stop_sequence and self.text.endswith(stop_sequence):
                end -= len(stop_sequence)
        else:
            end = len(self.text) - self._holdback()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out

    def final_text(self, text: str, stop_sequence: str | None) -> str:
        if stop_sequence and text.endswith(stop_sequence):
            return text[: -len(stop_sequence)]
        return text
