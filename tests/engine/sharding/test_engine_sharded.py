"""The serving engine (LLMEngine) on 8 simulated CPU devices: tensor-parallel and data-parallel
layouts generate what the one-device engine generates.

Owns: --num-shard 2, 4 and 8 and 2 replicas x 4 shards through the whole engine (sharded loading from
a saved checkpoint, the start-up layout checks, head-sharded attention, sharded KV caches, stacked
replica steps, sampling on vocab-sharded logits), compared with the unsharded engine on the same
prompts: greedy tokens equal, chosen-token logprobs within 1e-4 (float32); requests spread over
replicas by load; a layout the heads cannot split refused with a clear message. Must not: compare
against fixed numbers (the checkpoint and prompts are fresh random each run; the seed is printed).
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sharding.config import LayoutError, ShardingConfig
from tests.engine.sharding import harness as H

SEED = int(np.random.SeedSequence().entropy % 2**31)
VOCAB = H.HF_VOCAB
NEW_TOKENS = 8


def _engine(model_dir, tp: int, dp: int = 1) -> LLMEngine:
    cfg = EngineConfig(
        model_id=str(model_dir), dtype="float32", max_batch_size=4, max_batch_prefill_tokens=60,
        max_total_tokens=64, max_batch_total_tokens=512, page_size=4, max_top_n_tokens=0,
        # 60 prompt + 4 decode tokens a step: one token bucket (64), as compiles are the cost here.
        enable_prefill_logprobs=False, min_token_bucket=64,
        sharding=ShardingConfig(tensor_parallel=tp, data_parallel=dp),
    )
    return LLMEngine(cfg)


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, tuple[list[int], list[float]]]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    out: dict[str, tuple[list[int], list[float]]] = {f"r{i}": ([], []) for i in range(len(prompts))}
    engine.run_until_done(lambda o: [(out[o.request_id][0].append(t.token_id), out[o.request_id][1].append(t.logprob))
                                     for t in o.tokens])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    print(f"seed {SEED}")
    model_dir = H.save_hf_checkpoint(tmp_path_factory.mktemp("tp-llama"), SEED)
    rng = np.random.default_rng(SEED)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (11, 5, 17, 9)]
    reference = _generate(_engine(model_dir, 1), prompts)
    return model_dir, prompts, reference


@pytest.fixture(scope="module")
def engines(setup):
    """One engine per layout, shared by the tests of this module (each costs its compilations)."""
    cache: dict[tuple[int, int], LLMEngine] = {}

    def get(tp: int, dp: int = 1) -> LLMEngine:
        if (tp, dp) not in cache:
            cache[(tp, dp)] = _engine(setup[0], tp, dp)
        return cache[(tp, dp)]

    return get


# tp 2 is covered at the model level (test_sharded_model); here 4 and 8 also replicate kv heads.
@pytest.mark.parametrize("dp,tp", [(1, 4), (1, 8), (2, 4)], ids=["tp4", "tp8", "dp2xtp4"])
def test_layout_generates_what_one_device_does(setup, engines, dp, tp):
    model_dir, prompts, reference = setup
    engine = engines(tp, dp)
    assert engine.mesh is not None and dict(engine.mesh.shape) == {"data": dp, "model": tp}
    # Weights and caches really are split: kv heads over the shards, replicas over "data".
    k = engine.runner._kv_caches[0]
    kv_heads = engine.loaded.config.num_kv_heads
    assert kv_heads == max(2, tp)  # replicated at load when shards outnumber the checkpoint's 2
    assert k.sharding.shard_shape(k.shape)[-2] == kv_heads // tp
    if dp > 1:
        assert k.shape[0] == dp and k.sharding.shard_shape(k.shape)[0] == 1
    ours = _generate(engine, prompts)
    for rid, (tokens, lps) in reference.items():
        assert ours[rid][0] == tokens, f"{rid}: greedy tokens differ at tp={tp} dp={dp} (seed {SEED})"
        np.testing.assert_allclose(ours[rid][1], lps, rtol=1e-4, atol=1e-4)


def test_requests_spread_over_replicas(setup, engines):
    _, prompts, _ = setup
    engine = engines(4, 2)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=f"r{i}")
    assert [s.num_waiting for s in engine.schedulers] == [2, 2]
    engine.step()
    assert [s.num_running for s in engine.schedulers] == [2, 2]
    engine.abort("r0")
    engine.abort("r2")  # replica 0 now has none
    engine.add_request(prompts[0], params, request_id="late")
    assert engine._replica_of["late"] == 0
    engine.run_until_done()
    assert engine.stats().num_running == 0 and engine.stats().kv_cache_usage == 0


def test_heads_that_cannot_split_are_refused(setup):
    model_dir, _, _ = setup
    with pytest.raises(LayoutError, match="8 attention heads.*--num-shard 3"):
        _engine(model_dir, 3)
