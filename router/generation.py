"""Running requests on the engine: error mapping, aggregation, best_of and stream merging.

Owns: the one place that iterates EngineClient.generate (always closed with aclosing, so a
client that leaves cancels its engine request), the mapping of engine exceptions to router errors
(ValueError -> 422, anything else -> 424), and whole-request aggregation. Must not: format HTTP
responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Sequence

from engine.api import EngineClient, GeneratedToken, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams
from router.errors import GenerationError, InputValidationError, RouterError
from router.observe import RequestTracker


@dataclasses.dataclass
class Result:
    text: str = ""
    tokens: list[GeneratedToken] = dataclasses.field(default_factory=list)
    finish_reason: str = "length"
    seed: int | None = None
    prompt_tokens: tuple[TokenLogprob, ...] = ()
    num_prompt_tokens: int = 0
    num_generated: int = 0
    stop_sequence: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.tokens.extend(out.tokens)
        if out.prompt_tokens:
            self.prompt_tokens = out.prompt_tokens
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_generated = out.num_generated_tokens
        if out.seed is not None:
            self.seed = out.seed
        if out.finished:
            self.finish_reason = out.finish_reason or "length"
            self.stop_sequence = out.stop_sequence

    @property
    def mean_logprob(self) -> float:
        lps = [t.logprob for t in self.tokens if math.isfinite(t.logprob)]
        return sum(lps) / len(lps) if lps else -math.inf


async def stream(
    engine: EngineClient, ids: Sequence[int], params: SamplingParams, tracker: RequestTracker
) -> AsyncIterator[RequestOutput]:
    """The engine's outputs for one request, with engine errors turned into router errors."""
    gen = engine.generate(list(ids), params, request_id=uuid.uuid4().hex)
    async with contextlib.aclosing(gen):  # closing the engine iterator is what cancels the request
        try:
            async for out in tracker.observe(gen):
                yield out
        except RouterError:
            raise
        except ValueError as e:
            raise InputValidationError(str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:  # engine gone, RPC failure: TGI's 424
            raise GenerationError(str(e) or type(e).__name__) from e


async def collect(
    engine: EngineClient, ids: Sequence[int], params: SamplingParams, tracker: RequestTracker
) -> Result:
    res = Result(seed=params.seed)
    async for out in stream(engine, ids, params, tracker):
        res.add(out)
    return res


async def collect_many(
    engine: EngineClient, jobs: Sequence[tuple[Sequence[int], SamplingParams]], tracker: RequestTracker
) -> list[Result]:
    """Runs several requests concurrently (best_of, n, prompt lists); one failure cancels the rest."""
    tasks = [asyncio.ensure_future(collect(engine, ids, p, tracker)) for ids, p in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


async def merge(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleaves several output streams as (stream index, output) in arrival order."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
            await queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001  handed to the consumer, which re-raises it
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def prime[T](gen: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pulls the first item now, so errors raised before any output (the engine validates on the
    first step) become an HTTP status instead of an error event inside a 200 stream. The caller
    must aclose() the result even if it never iterates it (sse_response does)."""
    try:
        first = await anext(gen)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await gen.aclose()  # type: ignore[attr-defined]
        raise

    async def chained() -> AsyncIterator[T]:
        try:
            if first is not None:
                yield first
                async for item in gen:
                    yield item
        finally:
            await gen.aclose()  # type: ignore[attr-defined]

    return _Primed(chained(), gen)


class _Primed:
    """An async iterator whose aclose() also closes the primed source when never iterated."""

    def __init__(self, it: AsyncIterator, source: AsyncIterator) -> None:
        self._it, self._source = it, source

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self):
        return await self._it.__anext__()

    async def aclose(self) -> None:
        await self._it.aclose()  # type: ignore[attr-defined]
        await self._source.aclose()  # type: ignore[attr-defined]
