"""Scheduler: continuous batching with chunked prefill and preemption by recompute.

Owns: the waiting queue and the running set, which tokens of which requests each step computes,
the KV pages each request holds in every KV cache group (through their PageAllocators), returning
the pages that left a sliding window as soon as a step moves past them, preemption, and the
token-level stopping rules (EOS, stop token ids, length). Stop *strings* are found by the engine
in the detokenized text, which then calls finish_request().
Must not: import jax or numpy, touch device arrays, or detokenize. Each step's cost is O(batch).

A request runs only if every group can hold its pages: admission and growth check each pool, and
a shortage in any of them preempts. A sliding group needs at most a window plus a chunk of pages
per request, whatever its length (KVCacheGroup.peak_pages).

Protocol: the engine calls schedule(), runs the step, then update() with that schedule before the
next schedule(). With asynchronous steps update() comes right after the launch, with
Request.PLACEHOLDER for each sampled token (only length can stop a request then); the engine
writes the real ids in later and applies the token stops itself (token_stop_reason).
abort_request()/finish_request() may come at any time, including between the two; update() then
skips the finished request's chunks.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

from engine.kv_cache import KVCacheGroups, PageAllocator
from engine.request import FinishReason, Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int  # running requests at once
    max_batch_prefill_tokens: int  # prefill tokens per step; decode tokens do not count
    max_total_tokens: int  # prompt + generated, per request
    enable_chunked_prefill: bool = True
    # Fraction of usable KV pages an admission leaves free while others run, so running decodes
    # can grow into new pages without preempting the request that was just admitted.
    kv_watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be positive, got {self.max_batch_size}")
        if self.max_batch_prefill_tokens < 1:
            raise ValueError(
                f"`max_batch_prefill_tokens` must be positive, got {self.max_batch_prefill_tokens}"
            )
        if self.max_total_tokens < 2:
            raise ValueError(
                "`max_total_tokens` must be at least 2 (one prompt token and one generated), "
                f"got {self.max_total_tokens}"
            )
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"`kv_watermark` must be in [0, 1), got {self.kv_watermark}")


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in one step."""

    request: Request
    start: int  # == request.num_computed_tokens when scheduled
    num_tokens: int
    # Fixed at creation: the request gains a token in update(), after which the test would lie.
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        assert self.num_tokens >= 1 and 0 <= self.start, (self.start, self.num_tokens)
        assert self.start + self.num_tokens <= self.request.num_tokens, "chunk runs past the known tokens"
        object.__setattr__(self, "samples", self.start + self.num_tokens == self.request.num_tokens)

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.start + self.num_tokens]

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.samples


@dataclasses.dataclass(frozen=True)
class Schedule:
    chunks: tuple[ScheduledChunk, ...]  # decodes first, then prefill chunks
    preempted: tuple[Request, ...] = ()  # sent back to the waiting queue by this step
    num_tokens: int = dataclasses.field(init=False)
    num_prefill_tokens: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_tokens", sum(c.num_tokens for c in self.chunks))
        num_prefill_tokens = sum(c.num_tokens for c in self.chunks if not c.is_decode)
        object.__setattr__(self, "num_prefill_tokens", num_prefill_tokens)

    @property
    def num_decodes(self) -> int:
        return sum(1 for c in self.chunks if c.is_decode)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclasses.dataclass(frozen=True)
class RequestUpdate:
    request: Request
    new_token: int | None  # None for a prefill chunk that does not sample
    is_finished: bool
    finish_reason: FinishReason | None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_groups: KVCacheGroups | PageAllocator) -> None:
        """kv_groups: the model's KV cache groups; a bare PageAllocator is one full-attention group."""
        self.config = config
        if isinstance(kv_groups, PageAllocator):
            kv_groups = KVCacheGroups.single(kv_groups)
        self.kv_groups = kv_groups
        # Ordered dicts used as ordered sets: O(1) removal from the middle (aborts, finishes) and
        # O(1) insertion at the front of the waiting queue (preempted requests go first).
        self._waiting: collections.OrderedDict[Request, None] = collections.OrderedDict()
        self._running: dict[Request, None] = {}  # admission order: the newest is the preemption victim
        self._requests: dict[str, Request] = {}  # unfinished only
        self._watermark_pages = tuple(
            math.ceil(config.kv_watermark * g.allocator.num_usable_pages) for g in kv_groups
        )

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queues a request (FIFO). Raises ValueError when it could never run under this config."""
        cfg = self.config
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.pages:
            raise ValueError(f"request {request.request_id!r} was already scheduled once")
        num_prompt = request.num_tokens
        if num_prompt + 1 > cfg.max_total_tokens:
            raise ValueError(
                f"the prompt has {num_prompt} tokens; with one generated token that exceeds "
                f"max_total_tokens={cfg.max_total_tokens}"
            )
        if not cfg.enable_chunked_prefill and num_prompt > cfg.max_batch_prefill_tokens:
            raise ValueError(
                f"the prompt has {num_prompt} tokens, more than max_batch_prefill_tokens="
                f"{cfg.max_batch_prefill_tokens}, and chunked prefill is disabled"
            )
        # The KV of the last generated token is never computed, hence the - 1. Checking the most the
        # request can ever hold (not just its prompt) guarantees the oldest running request always
        # fits once the newer ones are preempted, so the engine cannot livelock.
        max_new_tokens = request.params.max_new_tokens
        max_final_tokens = min(request.num_prompt_tokens + max_new_tokens, cfg.max_total_tokens)
        for group in self.kv_groups:
            max_kv_pages = group.peak_pages(max_final_tokens - 1, cfg.max_batch_prefill_tokens)
            if max_kv_pages > group.allocator.num_usable_pages:
                which = "the cache" if group.window is None else f"the window-{group.window} layers' cache"
                raise ValueError(
                    f"the request may need {max_final_tokens - 1} tokens of KV cache ({max_kv_pages} pages) "
                    f"but {which} holds {group.allocator.capacity_tokens} tokens; lower max_new_tokens"
                )
        self._waiting[request] = None
        self._requests[request.request_id] = request

    def schedule(self) -> Schedule:
        cfg = self.config
        budget = cfg.max_batch_prefill_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Request] = []

        # Oldest first: victims are taken newest first, so a victim never already has a chunk in
        # this step (the only exception, the asking request itself, is handled by _reserve).
        for request in list(self._running):
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            start = request.num_computed_tokens
            if request.is_decoding:
                if self._reserve(request, request.num_tokens, preempted):
                    decodes.append(ScheduledChunk(request, start, 1))
                continue
            num_tokens = min(request.num_tokens - start, budget)
            if num_tokens == 0:
                continue  # budget spent: it keeps its pages and goes on next step
            # A prefill chunk shrinks to the free pages rather than preempt; it preempts only when
            # not even one token fits, since otherwise every prefill could wait on the others.
            if self._room(request) < 1 and not self._reserve(request, start + 1, preempted):
                continue
            num_tokens = min(num_tokens, self._room(request))
            reserved = self._reserve(request, start + num_tokens, preempted)
            assert reserved, "a chunk sized to the free pages needed a preemption"
            prefills.append(ScheduledChunk(request, start, num_tokens))
            budget -= num_tokens

        # Admitting right after a preemption would evict again at the next page boundary.
        if not preempted:
            budget = self._admit(budget, prefills)

        # An admitted one-token prompt is a decode in all but name; it goes with the decodes.
        chunks = (*decodes, *(c for c in prefills if c.is_decode), *(c for c in prefills if not c.is_decode))
        return Schedule(chunks=chunks, preempted=tuple(preempted))

    def update(self, schedule: Schedule, sampled_tokens: Sequence[int]) -> list[RequestUpdate]:
        """Applies one finished step. sampled_tokens[i] belongs to schedule.chunks[i]; values for
        chunks that do not sample are ignored."""
        if len(sampled_tokens) != len(schedule.chunks):
            raise ValueError(f"got {len(sampled_tokens)} sampled tokens for {len(schedule.chunks)} chunks")
        updates: list[RequestUpdate] = []
        for chunk, token in zip(schedule.chunks, sampled_tokens):
            request = chunk.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted or finished by the engine while the step ran
            assert request.num_computed_tokens == chunk.start, "update() applied out of order or twice"
            request.num_computed_tokens += chunk.num_tokens
            self._release_out_of_window(request)
            if not chunk.samples:
                updates.append(RequestUpdate(request, None, False, None))
                continue
            token = int(token)  # numpy scalars from the runner would otherwise leak into the lists
            request.append_output_token(token)
            reason = self._stop_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            updates.append(RequestUpdate(request, token, reason is not None, reason))
        return updates

    def abort_request(self, request_id: str) -> Request | None:
        """Cancels a waiting or running request and frees its pages now; None if unknown or done."""
        return self.finish_request(request_id, FinishReason.CANCELLED)

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Ends a request for a reason found outside the scheduler (e.g. a stop string in the text)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        self._finish(request, reason)
        return request

    @staticmethod
    def token_stop_reason(request: Request, token: int) -> FinishReason | None:
        """Whether `token` itself ends the request (EOS, a stop token id); length is not checked."""
        params = request.params
        if not params.ignore_eos and token in request.eos_token_ids:
            return FinishReason.EOS
        if token in params.stop_token_ids:
            return FinishReason.STOP_SEQUENCE
        return None

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if (reason := self.token_stop_reason(request, token)) is not None:
            return reason
        if request.num_output_tokens >= params.max_new_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.config.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def _admit(self, budget: int, prefills: list[ScheduledChunk]) -> int:
        """Admits waiting requests FIFO into the step; returns the prefill budget left."""
        cfg = self.config
        groups = self.kv_groups
        while self._waiting and len(self._running) < cfg.max_batch_size and budget > 0:
            request = next(iter(self._waiting))
            num_uncomputed = request.num_tokens  # num_computed_tokens is 0 while waiting
            # Without chunking a prompt waits for a step with room for all of it. A preempted request
            # can outgrow the whole budget; it is chunked anyway, because the budget is a hard cap.
            if (
                not cfg.enable_chunked_prefill
                and budget < num_uncomputed <= cfg.max_batch_prefill_tokens
            ):
                break
            # Room in every group for the whole prefill, not just this chunk, so a long prompt does
            # not start only to be preempted halfway. With nothing running all pages are free and it
            # always fits (add_request checked each group's peak).
            if any(
                g.peak_pages(num_uncomputed, cfg.max_batch_prefill_tokens) + (w if self._running else 0)
                > g.allocator.num_free_pages
                for g, w in zip(groups, self._watermark_pages)
            ):
                break
            num_tokens = min(num_uncomputed, budget)
            del self._waiting[request]
            request.status = RequestStatus.RUNNING
            self._running[request] = None
            request.pages = [g.allocator.allocate(g.allocator.pages_for(num_tokens)) for g in groups]
            prefills.append(ScheduledChunk(request, 0, num_tokens))
            budget -= num_tokens
        return budget

    def _room(self, request: Request) -> int:
        """Tokens past num_computed_tokens that fit in the request's pages plus the free pages of
        every group (a page list's length counts its released entries: they are positions)."""
        pages = min(len(p) + g.allocator.num_free_pages for g, p in zip(self.kv_groups, request.pages))
        return pages * self.kv_groups.page_size - request.num_computed_tokens

    def _reserve(self, request: Request, num_kv_tokens: int, preempted: list[Request]) -> bool:
        """Grows request's pages in every group to cover KV positions [0, num_kv_tokens), preempting
        the newest running requests while any group is short. False when the request itself was
        preempted."""
        groups = self.kv_groups
        needed = [g.allocator.pages_for(num_kv_tokens) - len(p) for g, p in zip(groups, request.pages)]
        if max(needed) <= 0:  # most decodes: their last page still has room
            return True
        while any(n > g.allocator.num_free_pages for g, n in zip(groups, needed)):
            victim = next(reversed(self._running))
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        for g, pages, n in zip(groups, request.pages, needed):
            if n > 0:
                pages.extend(g.allocator.allocate(n))
        return True

    def _release_out_of_window(self, request: Request) -> None:
        """Returns the pages no later step of the request can read to their sliding groups' pools;
        their entries become 0 (the trash page). Released pages always form a prefix, so the scan
        stops at the first entry already released: O(pages released)."""
        for group, pages in zip(self.kv_groups, request.pages):
            i = group.first_live_page(request.num_computed_tokens) - 1
            released = []
            while i >= 0 and pages[i]:
                released.append(pages[i])
                pages[i] = 0
                i -= 1
            if released:
                group.allocator.free(released)

    def _free_pages(self, request: Request) -> None:
        for group, pages in zip(self.kv_groups, request.pages):
            group.allocator.free(p for p in pages if p)
        request.pages = []

    def _preempt(self, request: Request) -> None:
        """Preemption by recompute: drop the KV, keep the tokens, and queue it first."""
        del self._running[request]
        self._free_pages(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._waiting[request] = None
        self._waiting.move_to_end(request, last=False)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self._running.pop(request, None)
        self._waiting.pop(request, None)
        self._free_pages(request)  # a waiting request holds none
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self._requests[request.request_id]
