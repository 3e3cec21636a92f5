"""Tests for engine/scheduler.py and engine/request.py: admission, chunking, decoding, preemption,
stopping, aborts, and a randomized run (also over sliding-window KV cache groups) that must end
with every page back in its pool."""

from __future__ import annotations

import random
import zlib

import pytest

from engine.kv_cache import KVCacheGroup, KVCacheGroups, PageAllocator
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Schedule, ScheduledChunk, Scheduler, SchedulerConfig

EOS = 2


def make_scheduler(
    *,
    max_batch_size: int = 4,
    max_batch_prefill_tokens: int = 16,
    max_total_tokens: int = 64,
    enable_chunked_prefill: bool = True,
    num_pages: int = 65,
    page_size: int = 4,
    kv_watermark: float = 0.0,
) -> Scheduler:
    config = SchedulerConfig(
        max_batch_size=max_batch_size,
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_total_tokens=max_total_tokens,
        enable_chunked_prefill=enable_chunked_prefill,
        kv_watermark=kv_watermark,
    )
    return Scheduler(config, PageAllocator(num_pages, page_size))


def make_request(request_id: str, num_prompt_tokens: int, **params) -> Request:
    params.setdefault("max_new_tokens", 8)
    prompt = [100 + i for i in range(num_prompt_tokens)]
    return Request.create(request_id, prompt, SamplingParams(**params), eos_token_ids={EOS})


def run_step(sched: Scheduler, token: int = 7) -> tuple[Schedule, list]:
    schedule = sched.schedule()
    return schedule, sched.update(schedule, [token] * len(schedule.chunks))


def spans(schedule: Schedule) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in schedule.chunks]


# ---- Request ---------------------------------------------------------------------------------


def test_request_create_resolves_seed_and_copies_prompt():
    prompt = [5, 6, 7]
    fixed = Request.create("a", prompt, SamplingParams(seed=1234), eos_token_ids=[EOS])
    drawn = Request.create("b", prompt, SamplingParams(), eos_token_ids=[EOS])
    assert fixed.seed == 1234
    assert 0 <= drawn.seed < 2**63
    prompt.append(8)
    assert fixed.prompt_token_ids == [5, 6, 7]
    assert fixed.eos_token_ids == frozenset({EOS})
    fixed.append_output_token(9)
    assert fixed.all_token_ids == [5, 6, 7, 9]
    assert (fixed.num_tokens, fixed.num_prompt_tokens, fixed.num_output_tokens) == (4, 3, 1)


@pytest.mark.parametrize(("request_id", "prompt"), [("a", []), ("", [1]), ("a", [1, -2]), ("a", [1.0])])
def test_request_create_rejects_bad_input(request_id, prompt):
    with pytest.raises(ValueError):
        Request.create(request_id, prompt, SamplingParams(), eos_token_ids=())


# ---- config and admission checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_batch_size=0),
        dict(max_batch_prefill_tokens=0),
        dict(max_total_tokens=1),
        dict(kv_watermark=1.0),
    ],
)
def test_config_validation(kwargs):
    base = dict(max_batch_size=1, max_batch_prefill_tokens=8, max_total_tokens=16)
    with pytest.raises(ValueError):
        SchedulerConfig(**(base | kwargs))


def test_add_request_rejects_requests_that_can_never_run():
    sched = make_scheduler(max_total_tokens=24, max_batch_prefill_tokens=8, num_pages=5, page_size=4)
    with pytest.raises(ValueError, match="max_total_tokens"):
        sched.add_request(make_request("long", 24))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add_request(make_request("big", 14, max_new_tokens=4))  # 17 tokens of KV; 4 pages hold 16
    sched.add_request(make_request("ok", 13, max_new_tokens=4))  # the last token's KV is never needed
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("ok", 1))
    unchunked = make_scheduler(enable_chunked_prefill=False, max_batch_prefill_tokens=8)
    with pytest.raises(ValueError, match="chunked prefill is disabled"):
        unchunked.add_request(make_request("a", 9))


# ---- admission ---------------------------------------------------------------------------------


def test_admission_respects_max_batch_size():
    sched = make_scheduler(max_batch_size=3)
    for i in range(5):
        sched.add_request(make_request(f"r{i}", 2))
    schedule, _ = run_step(sched)
    assert [c.request.request_id for c in schedule.chunks] == ["r0", "r1", "r2"]
    assert (sched.num_running, sched.num_waiting) == (3, 2)
    schedule, _ = run_step(sched)
    assert all(c.is_decode for c in schedule.chunks) and len(schedule.chunks) == 3


def test_admission_respects_prefill_budget_without_chunking():
    sched = make_scheduler(max_batch_prefill_tokens=16, enable_chunked_prefill=False)
    for name in "abc":
        sched.add_request(make_request(name, 7))
    schedule, _ = run_step(sched)
    assert spans(schedule) == [("a", 0, 7), ("b", 0, 7)]  # c's 7 tokens do not fit in the 2 left
    assert schedule.num_prefill_tokens == 14
    schedule, _ = run_step(sched)
    assert spans(schedule) == [("a", 7, 1), ("b", 7, 1), ("c", 0, 7)]
    assert schedule.num_prefill_tokens == 7 and schedule.num_tokens == 9


def test_chunked_prefill_chunks_positions_and_pages():
    sched = make_scheduler(max_batch_prefill_tokens=8, page_size=4)
    req = make_request("a", 20)
    sched.add_request(req)
    expected = [(0, 8, False), (8, 8, False), (16, 4, True)]
    for start, num_tokens, samples in expected:
        schedule, updates = run_step(sched, token=42)
        (chunk,) = schedule.chunks
        assert (chunk.start, chunk.num_tokens, chunk.samples) == (start, num_tokens, samples)
        assert not chunk.is_decode
        assert chunk.token_ids == req.prompt_token_ids[start : start + num_tokens]
        assert len(req.pages[0]) == sched.kv_groups.pages_for(start + num_tokens)  # exactly what it needs
        assert updates[0].new_token == (42 if samples else None)
    assert req.output_token_ids == [42]
    schedule, _ = run_step(sched)
    (chunk,) = schedule.chunks
    assert (chunk.start, chunk.num_tokens, chunk.is_decode, chunk.token_ids) == (20, 1, True, [42])
    assert chunk.samples  # fixed at creation, though the request has grown since
    assert len(req.pages[0]) == 6


def test_chunked_prefill_fills_the_budget_with_the_next_request():
    sched = make_scheduler(max_batch_prefill_tokens=8)
    sched.add_request(make_request("a", 5))
    sched.add_request(make_request("b", 10))
    sched.add_request(make_request("c", 3))
    schedule, _ = run_step(sched)
    assert spans(schedule) == [("a", 0, 5), ("b", 0, 3)]
    assert [c.samples for c in schedule.chunks] == [True, False]
    schedule, _ = run_step(sched)
    assert spans(schedule) == [("a", 5, 1), ("b", 3, 7), ("c", 0, 1)]  # c gets the one token left
    schedule, _ = run_step(sched)
    assert spans(schedule) == [("a", 6, 1), ("b", 10, 1), ("c", 1, 2)]
    assert [c.is_decode for c in schedule.chunks] == [True, True, False]


def test_every_running_request_decodes_each_step_and_decodes_come_first():
    sched = make_scheduler(max_batch_size=8)
    for name in "abc":
        sched.add_request(make_request(name, 3, max_new_tokens=50))
    run_step(sched)
    for step in range(5):
        if step == 2:
            sched.add_request(make_request("late", 4))
        schedule, _ = run_step(sched)
        decoders = [c.request.request_id for c in schedule.chunks if c.is_decode]
        assert decoders[:3] == ["a", "b", "c"]
        kinds = [c.is_decode for c in schedule.chunks]
        assert kinds == sorted(kinds, reverse=True)
    assert [sched.get_request(n).num_output_tokens for n in "abc"] == [6, 6, 6]


def test_one_token_prompt_is_sampled_on_admission():
    sched = make_scheduler()
    sched.add_request(make_request("a", 5))
    sched.add_request(make_request("b", 1))
    schedule, updates = run_step(sched)
    assert spans(schedule) == [("b", 0, 1), ("a", 0, 5)]
    assert [u.new_token for u in updates] == [7, 7]


# ---- preemption --------------------------------------------------------------------------------


def test_preemption_takes_newest_and_recompute_resumes_sampling():
    # 6 usable pages of 2 tokens: two 4-token prompts fit, then decoding runs out of pages.
    sched = make_scheduler(num_pages=7, page_size=2, max_total_tokens=16)
    a = make_request("a", 4, max_new_tokens=6)
    b = make_request("b", 4, max_new_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    for token in (10, 11, 12):
        schedule, _ = run_step(sched, token)
        assert not schedule.preempted
    assert a.num_tokens == b.num_tokens == 7 and sched.kv_groups[0].allocator.num_free_pages == 0
    schedule, _ = run_step(sched, 13)  # a needs a 4th page: b, the newest, makes room
    assert schedule.preempted == (b,)
    assert spans(schedule) == [("a", 6, 1)]
    assert (b.status, b.num_computed_tokens, b.pages, b.num_preemptions) == (RequestStatus.WAITING, 0, [], 1)
    assert b.output_token_ids == [10, 11, 12]
    while a.status is RequestStatus.RUNNING:
        schedule, _ = run_step(sched, 14)
        assert b not in [c.request for c in schedule.chunks]
    assert a.finish_reason is FinishReason.LENGTH and a.num_output_tokens == 6
    schedule, updates = run_step(sched, 20)  # b comes back: prompt and output are recomputed at once
    (chunk,) = schedule.chunks
    assert (chunk.request, chunk.start, chunk.num_tokens, chunk.samples) == (b, 0, 7, True)
    assert chunk.token_ids == b.prompt_token_ids + [10, 11, 12]
    assert b.output_token_ids == [10, 11, 12, 20] and updates[0].is_finished
    assert sched.kv_groups.is_full_free()


def test_newest_request_preempts_itself_when_it_alone_needs_a_page():
    sched = make_scheduler(num_pages=5, page_size=2, max_total_tokens=16)
    a = make_request("a", 3, max_new_tokens=4)  # 2 pages with a free slot
    b = make_request("b", 4, max_new_tokens=4)  # 2 full pages
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    schedule, _ = run_step(sched)
    assert schedule.preempted == (b,)
    assert spans(schedule) == [("a", 3, 1)]
    assert sched.kv_groups[0].allocator.num_free_pages == 2


def test_watermark_holds_back_admission_while_others_run():
    sched = make_scheduler(num_pages=11, page_size=2, kv_watermark=0.2)  # 2 pages held back
    sched.add_request(make_request("a", 8))  # 4 pages: admitted, nothing else runs
    sched.add_request(make_request("b", 8))  # 4 more would leave 2 free: exactly the watermark
    sched.add_request(make_request("c", 2))  # 1 more would leave 1 free: below it
    schedule, _ = run_step(sched)
    assert [c.request.request_id for c in schedule.chunks] == ["a", "b"]
    assert sched.num_waiting == 1


# ---- stopping ----------------------------------------------------------------------------------


def test_finish_on_eos_frees_pages():
    sched = make_scheduler()
    req = make_request("a", 3)
    sched.add_request(req)
    _, (update,) = run_step(sched, EOS)
    assert (update.is_finished, update.finish_reason, update.new_token) == (True, FinishReason.EOS, EOS)
    assert req.is_finished and req.pages == [] and sched.kv_groups.is_full_free()
    assert not sched.has_unfinished() and sched.get_request("a") is None


def test_ignore_eos_keeps_generating():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, ignore_eos=True, max_new_tokens=3))
    reasons = [run_step(sched, EOS)[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, FinishReason.LENGTH]


def test_finish_on_stop_token_and_max_new_tokens_and_max_total_tokens():
    sched = make_scheduler(max_total_tokens=8)
    sched.add_request(make_request("stop", 2, stop_token_ids=(99,)))
    sched.add_request(make_request("new", 2, max_new_tokens=2))
    sched.add_request(make_request("total", 5, max_new_tokens=100))
    finished = {}
    for token in (5, 6, 99, 99):
        for update in run_step(sched, token)[1]:
            if update.is_finished:
                finished[update.request.request_id] = (update.finish_reason, update.request.num_output_tokens)
    assert finished == {
        "new": (FinishReason.LENGTH, 2),
        "total": (FinishReason.LENGTH, 3),  # 5 + 3 == max_total_tokens
        "stop": (FinishReason.STOP_SEQUENCE, 3),
    }
    assert sched.kv_groups.is_full_free()


def test_abort_waiting_and_running_requests():
    sched = make_scheduler(max_batch_size=1)
    running, waiting = make_request("run", 3), make_request("wait", 3)
    sched.add_request(running)
    sched.add_request(waiting)
    run_step(sched)
    assert sched.abort_request("wait") is waiting
    assert sched.abort_request("run") is running
    for req in (running, waiting):
        assert (req.status, req.finish_reason) == (RequestStatus.FINISHED, FinishReason.CANCELLED)
        assert req.pages == []
    assert sched.abort_request("run") is None and sched.abort_request("nope") is None
    assert sched.kv_groups.is_full_free() and not sched.has_unfinished()
    assert run_step(sched)[0].is_empty


def test_abort_or_finish_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    for name in "abc":
        sched.add_request(make_request(name, 3))
    schedule = sched.schedule()
    assert sched.abort_request("a") is not None
    assert sched.finish_request("b", FinishReason.STOP_SEQUENCE) is not None
    updates = sched.update(schedule, [7, 7, 7])
    assert [u.request.request_id for u in updates] == ["c"]
    assert sched.get_request("a") is None
    assert sched.finish_request("b", FinishReason.STOP_SEQUENCE) is None
    sched.abort_request("c")
    assert sched.kv_groups.is_full_free()


def test_update_rejects_misaligned_tokens():
    sched = make_scheduler()
    sched.add_request(make_request("a", 3))
    schedule = sched.schedule()
    with pytest.raises(ValueError, match="sampled tokens"):
        sched.update(schedule, [])


def test_scheduled_chunk_rejects_chunks_past_the_known_tokens():
    req = make_request("a", 3)
    with pytest.raises(AssertionError):
        ScheduledChunk(req, 2, 2)


# ---- randomized run ----------------------------------------------------------------------------


def fake_token(request: Request, position: int) -> int:
    """A function of request and position only, like a seeded sampler: recompute must replay it."""
    return zlib.crc32(f"{request.request_id}:{position}".encode()) % 40


def check_step(sched: Scheduler, schedule: Schedule, requests: list[Request]) -> None:
    cfg, groups = sched.config, sched.kv_groups
    assert len(schedule.chunks) <= cfg.max_batch_size
    assert schedule.num_prefill_tokens <= cfg.max_batch_prefill_tokens
    kinds = [c.is_decode for c in schedule.chunks]
    assert kinds == sorted(kinds, reverse=True)
    chunk_of = {c.request.request_id: c for c in schedule.chunks}
    assert len(chunk_of) == len(schedule.chunks)
    for req in requests:
        if req.status is not RequestStatus.RUNNING:
            assert not req.pages and req.request_id not in chunk_of
            continue
        chunk = chunk_of.get(req.request_id)
        assert chunk is not None or not req.is_decoding, "a running decode was skipped"
        kv_tokens = req.num_computed_tokens + (chunk.num_tokens if chunk else 0)
        assert chunk is None or chunk.start == req.num_computed_tokens
        assert len(req.pages) == len(groups)
        for group, pages in zip(groups, req.pages):
            assert len(pages) == group.allocator.pages_for(kv_tokens), "pages must cover what is computed"
            # Live are exactly the pages this step may read: out-of-window ones went back at update().
            first = group.first_live_page(req.num_computed_tokens)
            assert not any(pages[:first]) and all(pages[first:])
            assert len(pages) - first <= group.peak_pages(kv_tokens, cfg.max_batch_prefill_tokens)
    for g, group in enumerate(groups):
        held = [p for req in requests if req.pages for p in req.pages[g] if p]
        assert len(set(held)) == len(held)
        assert len(held) + group.allocator.num_free_pages == group.allocator.num_usable_pages


def simulate(rng: random.Random, enable_chunked_prefill: bool, windows: tuple[int | None, ...]) -> int:
    """Runs random traffic to completion over KV cache groups of these windows, each with a random
    pool size; returns the number of preemptions it caused."""
    num_pages, page_size = rng.randint(6, 16), rng.choice([1, 2, 4])
    sizes = [num_pages] + [rng.randint(4, 16) for _ in windows[1:]]
    groups = KVCacheGroups([KVCacheGroup(w, PageAllocator(n, page_size)) for w, n in zip(windows, sizes)])
    config = SchedulerConfig(
        max_batch_size=rng.randint(1, 6),
        max_batch_prefill_tokens=rng.randint(3, 12),
        max_total_tokens=rng.randint(8, 40),
        enable_chunked_prefill=enable_chunked_prefill,
        kv_watermark=rng.choice([0.0, 0.1]),
    )
    sched = Scheduler(config, groups)
    requests: list[Request] = []
    num_arrivals = 40
    for _ in range(10_000):
        while num_arrivals and rng.random() < 0.3:
            num_arrivals -= 1
            params = SamplingParams(
                max_new_tokens=rng.randint(1, 20),
                stop_token_ids=(3,) if rng.random() < 0.3 else (),
                ignore_eos=rng.random() < 0.2,
            )
            prompt = [rng.randrange(40) for _ in range(rng.randint(1, 16))]
            req = Request.create(f"r{num_arrivals}", prompt, params, eos_token_ids={EOS})
            try:
                sched.add_request(req)
            except ValueError:
                continue  # too big for this random config
            requests.append(req)
        if not num_arrivals and not sched.has_unfinished():
            break
        schedule = sched.schedule()
        check_step(sched, schedule, requests)
        if schedule.chunks and rng.random() < 0.05:  # ends while the step is in flight
            victim = rng.choice(schedule.chunks).request.request_id
            if rng.random() < 0.5:
                sched.abort_request(victim)
            else:
                sched.finish_request(victim, FinishReason.STOP_SEQUENCE)
        tokens = [fake_token(c.request, c.start + c.num_tokens) if c.samples else -1 for c in schedule.chunks]
        for update in sched.update(schedule, tokens):
            assert update.is_finished == update.request.is_finished
        if requests and rng.random() < 0.03:
            sched.abort_request(rng.choice(requests).request_id)  # may be waiting, running or done
    else:
        pytest.fail("the scheduler stopped making progress")

    assert groups.is_full_free()
    assert sched.num_running == sched.num_waiting == 0
    for req in requests:
        assert req.is_finished and req.finish_reason is not None and not req.pages
        out = req.output_token_ids
        assert out == [fake_token(req, req.num_prompt_tokens + i) for i in range(len(out))]
        if req.finish_reason is FinishReason.EOS:
            assert out[-1] == EOS and not req.params.ignore_eos
        elif req.finish_reason is FinishReason.LENGTH:
            assert len(out) == req.params.max_new_tokens or req.num_tokens == config.max_total_tokens
    return sum(req.num_preemptions for req in requests)


@pytest.mark.parametrize("windows", [(None,), (None, 3), (5,), (None, 2, 6)])
@pytest.mark.parametrize("enable_chunked_prefill", [True, False])
def test_random_run_ends_every_request_and_leaks_no_pages(enable_chunked_prefill, windows):
    """With sliding groups too: every group's pages add up each step and all come back at the end."""
    rngs = [random.Random(seed) for seed in range(30)]
    num_preemptions = sum(simulate(rng, enable_chunked_prefill, windows) for rng in rngs)
    assert num_preemptions > 0, "the pools are meant to be small enough to force preemption"
