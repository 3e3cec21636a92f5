"""The engine's public interface: what callers (the CLI, the router, tests) see.

Owns: the output records an engine streams per request, engine information, and the EngineClient
protocol the router is written against. Must not: import jax or anything device-side, so the
router process can import it without pulling in JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token added to the output ("" while a multi-byte character is incomplete)
    logprob: float  # under the model's raw distribution
    is_special: bool
    top: tuple[TokenLogprob, ...] = ()  # the most likely alternatives, when top_n_tokens > 0


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """One engine step's news for one request: usually one token, the last one carries the finish."""

    request_id: str
    tokens: tuple[GeneratedToken, ...]
    text: str  # new output text since the previous RequestOutput
    finished: bool
    finish_reason: str | None  # "length" | "eos_token" | "stop_sequence" | "cancelled"
    num_prompt_tokens: int
    num_generated_tokens: int
    seed: int | None = None  # the seed actually used, for sampled requests
    stop_sequence: str | None = None
    # Set on a request's first output when params.prompt_logprobs: one entry per prompt token, the
    # first with logprob nan (nothing precedes it), as TGI's decoder_input_details reports.
    prompt_tokens: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole finished request, as the blocking API returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    tokens: tuple[GeneratedToken, ...]
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model_id: str
    model_dtype: str
    max_batch_size: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    page_size: int
    max_top_n_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    tokenizer_dir: str  # a directory AutoTokenizer.from_pretrained loads quickly (tokenizer.json + config)


@dataclasses.dataclass(frozen=True)
class StepStats:
    """The engine's state after one step (or at subscription time, with step_seconds 0)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_compiled_programs: int = 0
    batch_size: int = 0  # requests that produced a token in the step
    step_seconds: float = 0.0
    step_index: int = 0


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """Where a profiler capture was written (paths on the engine's machine)."""

    trace_dir: str  # the log directory: TensorBoard/XProf open it with --logdir
    xplane: str  # the XSpace file XProf reads ("" if the profiler wrote none)
    perfetto_trace: str  # perfetto_trace.json.gz, for ui.perfetto.dev ("" if none)
    seconds: float


class ProfilerBusyError(RuntimeError):
    """A trace is already being written; the JAX profiler runs one at a time."""


class EngineClient(Protocol):
    info: EngineInfo

    def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Streams the request's outputs; leaving the iteration early cancels the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def profile(self, seconds: float) -> ProfileResult:
        """Traces the engine process for `seconds`; ProfilerBusyError while another trace runs."""
        ...
