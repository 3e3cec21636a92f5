"""FakeEngine: a deterministic EngineClient for router tests, built on the real SmolLM2 tokenizer.

Owns: a scripted "model" that replies with a fixed sentence (rotated by the seed when sampling,
so seeds matter), EOS at its end unless ignore_eos, stop sequences, max_new_tokens, top_n_tokens,
prompt logprobs, an optional per-token delay, failure injection and a record of every request's
fate (finished / cancelled). Must not: import jax or anything engine-side beyond engine.api.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence

from engine.api import (
    EngineInfo,
    GeneratedToken,
    ProfilerBusyError,
    ProfileResult,
    RequestOutput,
    TokenLogprob,
)
from engine.sampling_params import SamplingParams

REPLY = " Hello world! This is a fake engine reply, token by token."


def make_info(tokenizer_dir: str, **overrides: object) -> EngineInfo:
    base = {
        "model_id": "fake/smollm2-135m",
        "model_dtype": "float32",
        "max_batch_size": 8,
        "max_input_tokens": 200,
        "max_total_tokens": 256,
        "max_batch_prefill_tokens": 512,
        "max_batch_total_tokens": 4096,
        "page_size": 16,
        "max_top_n_tokens": 5,
        "vocab_size": 49152,
        "eos_token_ids": (2,),
        "tokenizer_dir": tokenizer_dir,
    }
    base.update(overrides)
    return EngineInfo(**base)  # type: ignore[arg-type]


class FakeEngine:
    def __init__(self, tokenizer, info: EngineInfo, token_delay: float = 0.0) -> None:
        self.tok = tokenizer
        self.info = info
        self.token_delay = token_delay
        self.script = list(tokenizer.encode(REPLY, add_special_tokens=False)) + [info.eos_token_ids[0]]
        self.special = set(tokenizer.all_special_ids)
        self.fail_with: BaseException | None = None  # raised by the next generate() before any output
        self.fail_after: int | None = None  # the next request dies (RuntimeError) after this many tokens
        self.healthy = True
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.params: list[SamplingParams] = []
        self.running = 0
        self.profiles: list[float] = []  # the seconds of every capture asked for
        self.profiling = False
        self.profile_delay = 0.0  # how long a capture takes (real time, not `seconds`)

    async def health(self) -> bool:
        return self.healthy

    async def stats(self) -> dict[str, float]:
        return {
            "num_running": self.running,
            "num_waiting": 0,
            "kv_cache_usage": 0.25,
            "num_compiled_programs": 3,
        }

    async def abort(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    async def profile(self, seconds: float) -> ProfileResult:
        """Records the call; one capture at a time, like the engine (ProfilerBusyError otherwise)."""
        if self.profiling:
            raise ProfilerBusyError("a profile is already being captured into /tmp/fake-profile")
        self.profiling = True
        self.profiles.append(seconds)
        try:
            await asyncio.sleep(self.profile_delay)
        finally:
            self.profiling = False
        d = f"/tmp/fake-profile/capture-{len(self.profiles)}"
        return ProfileResult(d, f"{d}/plugins/profile/run/host.xplane.pb", f"{d}/plugins/profile/run/perfetto_trace.json.gz", seconds)

    def _logprob(self, tid: int, k: int) -> float:
        return -0.05 - ((tid * 7 + k) % 13) / 10.0

    def _text_of(self, ids: Sequence[int], skip: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip)

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        rid = request_id or f"req-{len(self.started)}"
        if self.fail_with is not None:
            err, self.fail_with = self.fail_with, None
            raise err
        ids = (
            list(self.tok.encode(prompt, add_special_tokens=False))
            if isinstance(prompt, str)
            else list(prompt)
        )
        if len(ids) > self.info.max_input_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens, more than {self.info.max_input_tokens}")
        self.started.append(rid)
        self.params.append(params)
        self.running += 1
        seed = params.seed
        fail_after, self.fail_after = self.fail_after, None
        start = 0 if params.is_greedy else (seed or 0) % (len(self.script) - 1)
        out_ids: list[int] = []
        text = ""
        finished = False
        try:
            for k in range(params.max_new_tokens):
                if fail_after is not None and k == fail_after:
                    raise RuntimeError("engine died mid-request")
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                tid = self.script[(start + k) % len(self.script)]
                is_eos = tid in self.info.eos_token_ids and not params.ignore_eos
                out_ids.append(tid)
                new_text = self._text_of(out_ids, params.skip_special_tokens)
                piece, text = new_text[len(text) :], new_text
                top = tuple(
                    TokenLogprob(a, self.tok.decode([a]), self._logprob(tid, k) - 0.5 * j)
                    for j, a in enumerate(
                        [tid, tid + 1, tid + 2, tid + 3, tid + 4, tid + 5][: params.top_n_tokens]
                    )
                )
                gt = GeneratedToken(tid, piece, self._logprob(tid, k), tid in self.special, top)
                reason, stop_seq = None, None
                if is_eos:
                    reason = "eos_token"
                elif (hit := next((s for s in params.stop if s in text), None)) is not None:
                    reason, stop_seq = "stop_sequence", hit
                elif k + 1 == params.max_new_tokens:
                    reason = "length"
                prompt_toks: tuple[TokenLogprob, ...] = ()
                if k == 0 and params.prompt_logprobs:
                    prompt_toks = tuple(
                        TokenLogprob(t, self.tok.decode([t]), math.nan if i == 0 else -1.0 - i / 100)
                        for i, t in enumerate(ids)
                    )
                finished = reason is not None
                yield RequestOutput(
                    request_id=rid,
                    tokens=(gt,),
                    text=piece,
                    finished=finished,
                    finish_reason=reason,
                    num_prompt_tokens=len(ids),
                    num_generated_tokens=k + 1,
                    seed=seed,
                    stop_sequence=stop_seq,
                    prompt_tokens=prompt_toks,
                )
                if finished:
                    self.finished.append(rid)
                    return
        finally:
            self.running -= 1
            if not finished:  # the caller stopped iterating: what a real client turns into an abort
                self.cancelled.append(rid)
