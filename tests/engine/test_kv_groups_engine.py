"""KV cache groups on device: sliding-window layers read their own pool, whose released pages are 0.

Owns: the reference attention's indifference to released (zeroed) page-table entries, the
per-group metadata a layer picks, and LLMEngine runs of a tiny all-sliding Mistral and a tiny
mixed full/sliding Qwen2 far past the window: greedy tokens equal transformers' generate (float32),
a batch equals each request alone, and the sliding pool stays at O(window) pages per request.
Must not: download anything; the tiny HF checkpoints are written here with fresh random weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.config import EngineConfig  # noqa: E402
from engine.kv_cache import peak_pages  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.loader import load_model  # noqa: E402
from engine.pallas_kernels.ragged_paged_attention import (  # noqa: E402
    AttentionMetadata,
    naive_ragged_paged_attention,
    ragged_paged_attention,
)
from engine.sampling_params import SamplingParams  # noqa: E402
from tests.engine.conftest import run_all  # noqa: E402
from tests.engine.models.checkpoints import save_spread_model  # noqa: E402

WINDOW = 16
PAGE_SIZE = 4
PREFILL = 32  # prompts of 40 tokens are chunked
MAX_BATCH = 4
VOCAB = 64
PROMPT_LEN = 40
NEW_TOKENS = 60


# ---- the attention function with released pages ---------------------------------------------


@pytest.mark.parametrize("attention", [ragged_paged_attention, naive_ragged_paged_attention])
def test_released_pages_change_nothing_under_the_window_mask(attention):
    """Zeroing the page-table entries of pages wholly before every token's window (the trash page
    holds garbage) gives bit-identical output: the window mask already hides those positions."""
    rng = np.random.default_rng(0)
    s, kh, g, h, window = 4, 2, 2, 8, 6
    num_pages, max_pages = 32, 12
    seq_lens = [37, 23]  # one decode, one 5-token chunk
    new = [1, 5]
    pages = rng.permutation(np.arange(1, num_pages))[: 2 * max_pages].reshape(2, max_pages)
    cache = jnp.asarray(rng.normal(size=(2, num_pages, s, kh, h)), jnp.float32)  # page 0 too: garbage
    t = 8  # 6 real tokens + padding
    positions, token_seq = np.zeros(t, np.int32), np.zeros(t, np.int32)
    slots = np.arange(t, dtype=np.int32) % s  # padding writes into page 0
    i = 0
    for r, (n, L) in enumerate(zip(new, seq_lens)):
        for p in range(L - n, L):
            positions[i], token_seq[i], slots[i] = p, r, pages[r, p // s] * s + p % s
            i += 1
    full = AttentionMetadata(
        jnp.asarray(positions), jnp.asarray(slots), jnp.asarray(token_seq), jnp.asarray(pages, jnp.int32),
        jnp.asarray(seq_lens, jnp.int32),
    )
    released = pages.copy()
    for r, (n, L) in enumerate(zip(new, seq_lens)):
        first_live = (L - n - window + 1) // s  # the first page the row's earliest token can see
        assert first_live > 0
        released[r, :first_live] = 0
        released[r, (L + s - 1) // s :] = 0  # past the sequence: padding entries, as the runner writes
    q = jnp.asarray(rng.normal(size=(t, kh * g, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(t, kh, h)), jnp.float32) for _ in range(2))
    run = functools.partial(attention, sm_scale=h**-0.5, sliding_window=window)
    out_full, cache_full = run(q, k, v, cache, full)
    md = dataclasses.replace(full, page_table=jnp.asarray(released))
    out_released, cache_released = run(q, k, v, cache, md)
    np.testing.assert_array_equal(np.asarray(out_released)[:i], np.asarray(out_full)[:i])
    np.testing.assert_array_equal(np.asarray(cache_released), np.asarray(cache_full))
    # The entries are not dead weight: without the window, zeroing them does change the output.
    out_nowin, _ = attention(q, k, v, cache, md, sm_scale=h**-0.5)
    out_nowin_full, _ = attention(q, k, v, cache, full, sm_scale=h**-0.5)
    assert not np.allclose(np.asarray(out_nowin)[:i], np.asarray(out_nowin_full)[:i])


def test_metadata_for_group_picks_that_groups_tables():
    a, b = jnp.arange(6).reshape(2, 3), jnp.arange(6, 12).reshape(2, 3)
    s0, s1 = jnp.arange(4), jnp.arange(4, 8)
    md = AttentionMetadata(jnp.zeros(4), s0, jnp.zeros(4), a, jnp.zeros(2), (b,), (s1,))
    assert md.for_group(0) is md
    g1 = md.for_group(1)
    assert g1.page_table is b and g1.slot_mapping is s1 and g1.positions is md.positions
    assert g1.group_page_tables == () and g1.group_slot_mappings == ()
    single = AttentionMetadata(jnp.zeros(4), s0, jnp.zeros(4), a, jnp.zeros(2))
    assert single.for_group(1) is single  # one pool shared by every layer
    leaves = jax.tree.leaves(md)
    assert len(leaves) == 7  # the group tables travel through jit as ordinary leaves


# ---- LLMEngine over tiny sliding-window models --------------------------------------------------


def _save_model(directory, family: str):
    cls_cfg, cls_model = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    extra = (
        dict(sliding_window=WINDOW)
        if family == "mistral"
        else dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)  # layer 0 full
    )
    config = cls_cfg(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, **extra,
    )
    model = save_spread_model(directory, cls_model, config, seed=1, std=0.4)
    model.generation_config.eos_token_id = None  # generate as far as asked, like ignore_eos
    return model.eval()


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf = _save_model(directory, request.param)
    engine = LLMEngine(
        EngineConfig(
            dtype="float32", max_batch_size=MAX_BATCH, max_batch_prefill_tokens=PREFILL, max_total_tokens=128,
            page_size=PAGE_SIZE, max_top_n_tokens=0, enable_prefill_logprobs=False,
            min_token_bucket=64,  # one token bucket (36): each forward program costs seconds to compile
        ),
        loaded=load_model(str(directory), dtype="float32"),
    )
    return request.param, hf, engine


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(5, VOCAB, size=PROMPT_LEN).tolist() for _ in range(n)]


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_groups_follow_the_layers(tiny):
    family, _, engine = tiny
    windows = [g.window for g in engine.kv_groups]
    assert windows == ([WINDOW] if family == "mistral" else [None, WINDOW])
    sliding = engine.kv_groups[-1].allocator
    # Sized for the batch's peak only: MAX_BATCH requests of a window plus a chunk each.
    assert sliding.num_usable_pages == MAX_BATCH * peak_pages(WINDOW, 127, PREFILL, PAGE_SIZE)
    if family == "qwen2":
        full = engine.kv_groups[0].allocator
        assert full.capacity_tokens == engine.limits.kv_capacity_tokens == MAX_BATCH * 128
    group_of = engine.loaded.config.kv_group_of
    pool_sizes = [engine.kv_groups[group_of(i)].allocator.num_pages for i in range(3)]
    assert [c.shape[1] for c in engine.runner._kv_caches] == pool_sizes


def test_greedy_matches_transformers_and_sliding_pages_stay_bounded(tiny):
    family, hf, engine = tiny
    prompts = _prompts(6, seed=2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    sliding_g = len(engine.kv_groups) - 1
    sliding = engine.kv_groups[sliding_g].allocator
    decode_bound = peak_pages(WINDOW, 10**6, 1, PAGE_SIZE)  # a decode step's window: 5 pages
    step_bound = peak_pages(WINDOW, 10**6, PREFILL, PAGE_SIZE)
    # What the runner hands the device each step: the chunks' starts and the sliding group's tables.
    steps, tables = [], []
    forward, prepare = engine.runner._forward_programs, engine.runner.prepare

    def recording(program):
        def call(leaves, caches, prev_tokens, ids, prev_index, md, idx):
            tables.append((np.asarray(md.seq_lens), np.asarray(md.for_group(sliding_g).page_table)))
            return program(leaves, caches, prev_tokens, ids, prev_index, md, idx)
        return call

    def recording_prepare(schedules):
        steps.append([c.start for c in schedules[0].chunks])  # one replica
        return prepare(schedules)

    originals = dict(forward)
    forward.update({t: recording(p) for t, p in originals.items()})
    engine.runner.prepare = recording_prepare
    reqs = [engine.add_request(p, params) for p in prompts]
    tokens = {r.request_id: [] for r in reqs}
    max_used = 0
    try:
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id].extend(t.token_id for t in out.tokens)
            running = [r for r in reqs if r.pages]
            live = [sum(1 for p in r.pages[sliding_g] if p) for r in running]
            assert sliding.num_used_pages == sum(live), "the pool's count must be the requests' live pages"
            for r, n in zip(running, live):
                assert n <= (decode_bound if r.num_computed_tokens >= PROMPT_LEN else step_bound)
            max_used = max(max_used, sliding.num_used_pages)
    finally:
        forward.update(originals)
        del engine.runner.prepare
    assert engine.kv_groups.is_full_free()
    # Every request reached 100 tokens (25 pages) while the pool never held more than a window each.
    assert max_used <= MAX_BATCH * step_bound < MAX_BATCH * (PROMPT_LEN + NEW_TOKENS) // PAGE_SIZE
    # In the sliding page table, exactly the pages before the step's window are 0 (the trash page).
    assert len(steps) == len(tables)
    zeroed = 0
    for starts, (seq_lens, table) in zip(steps, tables):
        for row, start in enumerate(starts):
            first = max(start - WINDOW + 1, 0) // PAGE_SIZE
            n_pages = -(-int(seq_lens[row]) // PAGE_SIZE)
            assert not table[row, :first].any() and table[row, first:n_pages].all()
            assert not table[row, n_pages:].any()
            zeroed += first
    assert zeroed > 0
    got = [tokens[r.request_id] for r in reqs]
    assert all(len(g) == NEW_TOKENS for g in got)
    want = [_hf_greedy(hf, p) for p in prompts]
    assert got == want, family
    # A batch of many gives a request the tokens it gets alone (its prefill was chunked among others').
    assert run_all(engine, [prompts[1]], params)[0] == got[1]
