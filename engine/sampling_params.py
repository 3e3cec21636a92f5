"""SamplingParams: what one request asks of the sampler and the stopping rules.

Owns: the per-request generation knobs and their validation (a bad value raises ValueError with a
message fit to show the user). Must not: import jax; the runner turns these into device arrays.
"""

from __future__ import annotations

import dataclasses


MAX_LOGIT_BIAS = 300  # OpenAI's cap; fixes the sampler's static bias width


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; over prompt and output tokens (CTRL-style)
    frequency_penalty: float = 0.0  # 0: off; over output tokens (OpenAI-style)
    presence_penalty: float = 0.0  # 0: off; over output tokens (OpenAI-style)
    seed: int | None = None  # None: the engine draws one at admission, so preemption replays it
    stop: tuple[str, ...] = ()  # stop sequences, matched on the detokenized output
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_n_tokens: int = 0  # logprobs of this many most likely alternatives per step
    skip_special_tokens: bool = True
    prompt_logprobs: bool = False  # logprob of every prompt token (TGI's decoder_input_details)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), OpenAI-style

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if self.max_new_tokens < 1:
            bad("`max_new_tokens` must be strictly positive")
        if self.temperature < 0:
            bad("`temperature` must be non-negative")
        if self.top_k < 0:
            bad("`top_k` must be non-negative (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            bad("`top_p` must be > 0.0 and <= 1.0")
        if not 0.0 < self.typical_p <= 1.0:
            bad("`typical_p` must be > 0.0 and <= 1.0")
        if self.repetition_penalty <= 0:
            bad("`repetition_penalty` must be strictly positive")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("`frequency_penalty` must be >= -2.0 and <= 2.0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("`presence_penalty` must be >= -2.0 and <= 2.0")
        if self.top_n_tokens < 0:
            bad("`top_n_tokens` must be non-negative")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad("`seed` must be a non-negative 64-bit integer")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            bad(f"`logit_bias` may name at most {MAX_LOGIT_BIAS} tokens")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            bad("`logit_bias` values must be >= -100 and <= 100")
        if any(not s for s in self.stop):
            bad("stop sequences must be non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """Whether the sampler needs the token history and logit bias (one compiled variant for both)."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
            or bool(self.logit_bias)
        )
