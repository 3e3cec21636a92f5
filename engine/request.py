"""Request: the host-side state of one generation request, from arrival to finish.

Owns: a request's tokens (prompt and output), how much of its KV is computed, the KV pages it
holds in each KV cache group, its lifecycle status and why it finished, and its resolved seed.
Must not: import jax or numpy, allocate or free pages (the scheduler does, through the
PageAllocator), or decide when a request stops (the scheduler does).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import random
import time
from collections.abc import Iterable, Sequence

from engine.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclasses.dataclass(eq=False)
class Request:
    """eq=False: requests are compared by identity, so they can key dicts and sit in sets."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    # Resolved once at creation so a preempted request replays the same samples on recompute.
    seed: int
    arrival_time: float
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # One page list per KV cache group (engine.kv_cache.KVCacheGroups order), indexed by logical page
    # (position // page_size); 0 marks a page that left a sliding window and went back to the pool.
    # Empty while the request holds no pages.
    pages: list[list[int]] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # prompt + output in one list, so slicing the tokens of a chunk never concatenates.
    _all_token_ids: list[int] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        eos_token_ids: Iterable[int],
        arrival_time: float | None = None,
    ) -> Request:
        """Validates the input and resolves the seed; arrival_time defaults to time.monotonic()."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("`request_id` must be a non-empty string")
        try:
            # A copy, since the caller may reuse its list; operator.index takes numpy ints, not floats.
            prompt = [operator.index(t) for t in prompt_token_ids]
        except TypeError:
            raise ValueError("prompt token ids must be integers") from None
        if not prompt:
            raise ValueError("the prompt must contain at least one token")
        if min(prompt) < 0:
            raise ValueError("prompt token ids must be non-negative")
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        return cls(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            eos_token_ids=frozenset(eos_token_ids),
            seed=seed,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
        )

    # The token id an output holds while it is still being sampled on the device (asynchronous steps:
    # the next step is scheduled before this one's sample reaches the host). Never a real id.
    PLACEHOLDER = -1

    def set_output_token(self, index: int, token_id: int) -> None:
        """Replaces the output token at `index` (a PLACEHOLDER) with the sampled id."""
        self.output_token_ids[index] = token_id
        self._all_token_ids[self.num_prompt_tokens + index] = token_id

    def truncate_output(self, num_tokens: int) -> None:
        """Drops output tokens past the first `num_tokens` (placeholders of steps after the one
        where the request turned out to have stopped)."""
        del self.output_token_ids[num_tokens:]
        del self._all_token_ids[self.num_prompt_tokens + num_tokens:]
        self.num_computed_tokens = min(self.num_computed_tokens, self.num_tokens)

    def append_output_token(self, token_id: int) -> None:
        """The only way to add an output token: it keeps output_token_ids and all_token_ids in step."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    @property
    def all_token_ids(self) -> list[int]:
        """prompt + output. A view of internal state: read it, never mutate it."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_decoding(self) -> bool:
        """Every token but the last has its KV: the next step feeds that one token and samples."""
        return self.num_tokens - self.num_computed_tokens == 1
