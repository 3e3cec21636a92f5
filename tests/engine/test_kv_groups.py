"""KV cache groups on the host: the layer -> group map, pool sizing, and the scheduler releasing
sliding-window pages while requests run (reuse, admission and preemption across groups, no leaks).

Pure Python: no jax (the device side is in test_kv_groups_engine.py).
"""

from __future__ import annotations

import pytest

from engine.config import EngineConfig, KVGroupSpec, resolve_limits
from engine.kv_cache import KVCacheGroup, KVCacheGroups, PageAllocator, peak_pages
from engine.models.config import ModelConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

EOS = 2


def make_groups(page_size: int, *pools: tuple[int | None, int]) -> KVCacheGroups:
    """pools: (window, usable pages) per group."""
    return KVCacheGroups([KVCacheGroup(w, PageAllocator(n + 1, page_size)) for w, n in pools])


def make_scheduler(groups: KVCacheGroups, *, prefill: int = 8, batch: int = 4, total: int = 128) -> Scheduler:
    cfg = SchedulerConfig(max_batch_size=batch, max_batch_prefill_tokens=prefill, max_total_tokens=total,
                          kv_watermark=0.0)
    return Scheduler(cfg, groups)


def make_request(request_id: str, num_prompt_tokens: int, max_new_tokens: int) -> Request:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return Request.create(request_id, [10 + i for i in range(num_prompt_tokens)], params, eos_token_ids={EOS})


def step(sched: Scheduler, token: int = 7):
    schedule = sched.schedule()
    sched.update(schedule, [token] * len(schedule.chunks))
    return schedule


def live(pages: list[int]) -> list[int]:
    return [p for p in pages if p]


# ---- the model's groups ----------------------------------------------------------------------


def _model(**kw) -> ModelConfig:
    base = dict(architecture="X", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=4, num_heads=2,
                num_kv_heads=1, head_dim=4)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize(
    ("kw", "windows", "groups"),
    [
        (dict(), (None,), [0, 0, 0, 0]),  # Llama
        (dict(sliding_window=16), (16,), [0, 0, 0, 0]),  # Mistral: every layer slides
        (dict(sliding_window=16, layer_types=("full_attention",) + ("sliding_attention",) * 3), (None, 16),
         [0, 1, 1, 1]),  # Qwen2 max_window_layers=1
        (dict(sliding_window=512, layer_types=("sliding_attention",) * 3 + ("full_attention",)), (None, 512),
         [1, 1, 1, 0]),  # Gemma-style interleaving
    ],
)
def test_kv_groups_follow_layer_windows(kw, windows, groups):
    config = _model(**kw)
    assert config.kv_cache_windows() == windows
    assert [config.kv_group_of(i) for i in range(4)] == groups


def test_peak_pages():
    # Window 16, pages of 4: a decode reads 15 earlier positions + itself -> 4 pages, 5 when unaligned.
    assert peak_pages(16, 1000, 1, 4) == 5
    assert peak_pages(16, 1000, 32, 4) == 13
    assert peak_pages(16, 10, 32, 4) == 3  # never more than the whole request
    assert peak_pages(None, 1000, 1, 4) == 250


# ---- sizing ------------------------------------------------------------------------------------

GIB = 2**30


def _limits(groups, free=64 * GIB, **cfg):
    base = dict(max_batch_size=8, max_total_tokens=1024, max_batch_prefill_tokens=256, page_size=16)
    return resolve_limits(EngineConfig(**(base | cfg)), max_position_embeddings=4096, kv_groups=groups,
                          free_memory_bytes=free, is_accelerator=True)


def test_full_attention_only_sizes_as_before():
    limits = _limits([KVGroupSpec(None, 1000)], max_batch_total_tokens=4000)
    (group,) = limits.kv_groups
    assert (group.window, group.num_pages, limits.kv_capacity_tokens) == (None, 251, 4000)
    # From memory: as many pages as fit.
    limits = _limits([KVGroupSpec(None, 1000)], free=100 * 16 * 1000 + 999)
    assert limits.kv_groups[0].num_pages == 101 and limits.kv_capacity_tokens == 1600


def test_sliding_groups_get_at_most_the_batch_peak():
    peak = peak_pages(64, 1023, 256, 16)  # 21
    groups = [KVGroupSpec(None, 1000), KVGroupSpec(64, 5000)]
    limits = _limits(groups)  # plenty of memory: full pool holds max_batch_size full requests
    full, sliding = limits.kv_groups
    assert limits.kv_capacity_tokens == 8 * 1024 and full.num_pages == 8 * 1024 // 16 + 1
    assert sliding.num_pages == 8 * peak + 1
    # A small full pool: the sliding one never needs more pages than it (a request holds fewer).
    limits = _limits(groups, max_batch_total_tokens=1024)
    assert [g.num_pages for g in limits.kv_groups] == [65, 65]


def test_memory_is_split_so_every_group_fits_the_budget():
    groups = [KVGroupSpec(None, 1000), KVGroupSpec(64, 5000)]
    free = 10_000_000  # room for ~104 pages of both groups: fewer than the sliding cap of 168
    limits = _limits(groups, free=free)
    full, sliding = limits.kv_groups
    used = ((full.num_pages - 1) * 1000 + (sliding.num_pages - 1) * 5000) * 16
    assert used <= free
    # One more full page (and the sliding pages it brings) would not fit.
    more = (1000 + (5000 if sliding.num_pages - 1 < 8 * peak_pages(64, 1023, 256, 16) else 0)) * 16
    assert used + more > free
    assert limits.kv_capacity_tokens == (full.num_pages - 1) * 16 >= 1024
    with pytest.raises(ValueError, match="GiB"):
        _limits(groups, free=free, max_batch_total_tokens=8192)


def test_all_sliding_model_keeps_a_window_per_request():
    peak = peak_pages(64, 1023, 256, 16)
    limits = _limits([KVGroupSpec(64, 1000)])
    (sliding,) = limits.kv_groups
    assert sliding.num_pages == 8 * peak + 1  # not 8 * 1024 tokens' worth
    assert limits.kv_capacity_tokens == 8 * 1024
    with pytest.raises(ValueError, match="window-64"):  # memory for less than one request's window
        _limits([KVGroupSpec(64, 1000)], free=(peak - 1) * 16 * 1000)


# ---- the scheduler ---------------------------------------------------------------------------


def test_sliding_request_releases_pages_as_it_advances():
    window, s = 4, 2
    groups = make_groups(s, (None, 64), (window, 64))
    sched = make_scheduler(groups)
    req = make_request("a", 3, max_new_tokens=40)
    sched.add_request(req)
    full, sliding = groups[0].allocator, groups[1].allocator
    while not req.is_finished:
        step(sched)
        if req.is_finished:
            break
        full_pages, sliding_pages = req.pages
        n = req.num_computed_tokens
        first = max(n - window + 1, 0) // s  # the next step's first token (position n) sees n-3..n
        assert full_pages == live(full_pages) and len(full_pages) == -(-n // s)
        assert sliding_pages[:first] == [0] * first, "out-of-window pages read as the trash page"
        assert all(sliding_pages[first:]) and len(sliding_pages) == len(full_pages)
        assert len(live(sliding_pages)) <= peak_pages(window, 10**6, 1, s) - 1  # 2 between steps
        assert sliding.num_used_pages == len(live(sliding_pages))
        assert full.num_used_pages == len(full_pages)
    assert req.num_tokens == 43 and groups.is_full_free()


def test_released_pages_are_reused_by_other_requests():
    # 10 pages of 2 hold 20 tokens; two requests of 44 tokens each run side by side without preemption.
    groups = make_groups(2, (4, 10))
    sched = make_scheduler(groups, prefill=4)
    a, b = make_request("a", 4, max_new_tokens=40), make_request("b", 4, max_new_tokens=40)
    sched.add_request(a)
    sched.add_request(b)
    seen = {a: set(), b: set()}
    while sched.has_unfinished():
        schedule = step(sched)
        assert not schedule.preempted
        for r in (a, b):
            if r.pages:
                seen[r].update(live(r.pages[0]))
    assert a.num_output_tokens == b.num_output_tokens == 40
    assert a.num_preemptions == b.num_preemptions == 0
    # Each went through more tokens than the whole pool holds, on pages the other had held.
    assert a.num_tokens > 2 * 10 and seen[a] & seen[b]
    assert groups.is_full_free()


def test_admission_waits_until_every_group_has_room():
    # Plenty of full-attention pages; the window-2 pool of 5 pages of 2 is what admission waits on.
    groups = make_groups(2, (None, 64), (2, 5))
    sched = make_scheduler(groups, prefill=6)
    a, b = make_request("a", 6, max_new_tokens=10), make_request("b", 8, max_new_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    schedule = step(sched)  # a's prefill takes 3 sliding pages; b's needs 4 (a 6-token chunk + window)
    assert [c.request for c in schedule.chunks] == [a] and sched.num_waiting == 1
    assert len(live(a.pages[1])) == 1  # after its prefill only the last page is in the window
    schedule = step(sched)  # a's decode takes another page (2 live): 3 free, still short for b
    assert [c.request for c in schedule.chunks] == [a] and sched.num_waiting == 1
    assert groups[0].allocator.num_free_pages > 50
    schedule = step(sched)  # a released a page at the last update: b fits beside it
    assert [(c.request, c.num_tokens) for c in schedule.chunks] == [(a, 1), (b, 6)]
    while sched.has_unfinished():
        step(sched)
    assert a.num_preemptions == b.num_preemptions == 0 and groups.is_full_free()


def test_a_short_sliding_pool_preempts_and_the_victim_recomputes():
    # Window 4, pages of 2: a decode holds up to 3 sliding pages; two decodes can need 6 of 5.
    groups = make_groups(2, (None, 64), (4, 5))
    sched = make_scheduler(groups, prefill=4)
    a, b = make_request("a", 3, max_new_tokens=20), make_request("b", 4, max_new_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    while not preempted:
        assert groups[0].allocator.num_free_pages > 40  # the full-attention pool is never short
        schedule = step(sched)
        preempted = list(schedule.preempted)
        assert a.status is RequestStatus.RUNNING
    assert preempted == [b] and b.pages == [] and b.num_computed_tokens == 0
    # b's pages came back in both groups, though only the sliding one was short.
    assert groups[0].allocator.num_used_pages == len(a.pages[0])
    assert groups[1].allocator.num_used_pages == len(live(a.pages[1]))
    outputs_at_preemption = list(b.output_token_ids)
    while sched.has_unfinished():
        step(sched, token=9)
    assert b.num_preemptions >= 1
    assert b.output_token_ids[: len(outputs_at_preemption)] == outputs_at_preemption
    assert a.num_output_tokens == b.num_output_tokens == 20
    assert groups.is_full_free()


def test_add_request_checks_every_group():
    groups = make_groups(2, (None, 64), (4, 3))
    sched = make_scheduler(groups, prefill=4)
    with pytest.raises(ValueError, match="window-4 layers"):
        sched.add_request(make_request("a", 10, max_new_tokens=4))  # a 4-token chunk + window: 5 pages
    sched.add_request(make_request("b", 4, max_new_tokens=1))  # 4 tokens of KV: 2 pages
