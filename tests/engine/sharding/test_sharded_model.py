"""Sharded models on 8 simulated CPU devices give the unsharded model's greedy tokens and logits.

Owns: tensor parallelism 1, 2, 4, 8 and 2 replicas x 4 shards on a tiny Llama (2 kv heads, so 4
and 8 shards replicate them) and a tiny Qwen2-MoE (shared expert, a dense layer), and 8 shards of
a Phi-3 (fused projections), each through a ragged prefill and 8 greedy decode steps over
shuffled pages, float32, logits within 1e-4 relative error; that parameters, KV caches and logits really are split the way the rules say; and
sampling on vocab-sharded logits. Must not: compare against fixed numbers (weights and prompts
are fresh each run; the seed is printed for replay).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from engine.models.params import named_params
from engine.sampling import SamplingRow, build_sampling_metadata, sample
from engine.sampling_params import SamplingParams
from engine.sharding import rules
from engine.sharding.config import ShardingConfig
from engine.sharding.load import load_sharded
from engine.sharding.mesh import make_mesh
from engine.sharding.replicas import over_replicas, put_stacked, stack, unstack
from tests.engine.sharding import harness as H

LAYOUTS = {"tp1": (1, 1), "tp2": (1, 2), "tp4": (1, 4), "tp8": (1, 8), "dp2xtp4": (2, 4)}
SEED = int(np.random.SeedSequence().entropy % 2**31)


@pytest.fixture(scope="module", params=["llama", "moe"])
def reference(request):
    name = request.param
    if not H.supported(name):
        pytest.skip(f"{H.CONFIGS[name]['architectures'][0]} is not registered yet")
    print(f"seed {SEED}")  # shown on failure, to replay a run
    config, tensors, run = H.unsharded(name, seed=SEED)
    batches = [H.prompts(SEED + 1), H.prompts(SEED + 2, (7, 13, 3))]  # one per replica
    return name, config, tensors, batches, [run(b, seed=SEED + i) for i, b in enumerate(batches)]


def _mesh(dp: int, tp: int):
    return make_mesh(ShardingConfig(tensor_parallel=tp, data_parallel=dp), jax.devices()[: dp * tp])


def _check_param_layout(sharded, tp: int) -> None:
    params = {n: p.get_value() for n, p in named_params(sharded.model).items()}
    h = sharded.config.head_dim
    k_heads = sharded.config.num_kv_heads
    assert k_heads % tp == 0 and k_heads >= tp  # replicated at load when the checkpoint had fewer
    for name, value in params.items():
        assert len(value.addressable_shards) == len(sharded.mesh.devices.flat), name
        want = rules.param_sharding(sharded.mesh, name, value.shape).spec
        assert value.sharding.spec == want, name
    k_proj = params["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.addressable_shards[0].data.shape == (k_heads // tp * h, sharded.config.hidden_size)
    embed = params["model.embed_tokens.weight"]  # [V, D]
    assert embed.addressable_shards[0].data.shape == (embed.shape[0] // tp, embed.shape[1])
    if tp > 1:
        assert params["model.layers.0.self_attn.o_proj.weight"].sharding.spec == P(None, "model")
        assert params["model.norm.weight"].sharding.spec == P()
    if sharded.config.num_experts:
        gate_up = params["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2F, D]
        e, two_f, d = gate_up.shape
        assert gate_up.addressable_shards[0].data.shape == (e, two_f // tp, d)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_unsharded(reference, layout):
    name, config, tensors, batches, want = reference
    dp, tp = LAYOUTS[layout]
    mesh = _mesh(dp, tp)
    sharded = load_sharded(config, tensors, dtype=jnp.float32, mesh=mesh)
    _check_param_layout(sharded, tp)
    weights = nnx.state(sharded.model)
    step = H.logits_step(sharded.model)
    if dp == 1:
        jitted = jax.jit(step)
        cache_sharding = rules.kv_cache_sharding(mesh)
        caches = tuple(jax.device_put(c, cache_sharding) for c in H.zero_caches(sharded.config))
        last = {}

        def run_step(ids, c, md):
            last["out"] = jitted(weights, ids, c, md)
            return last["out"]

        runs = [H.greedy(run_step, caches, batches[0], seed=SEED)]
        logits, caches = last["out"]
        cache_spec = P(None, None, None, "model") if tp > 1 else P()
    else:
        runs, logits, caches = _data_parallel(step, weights, sharded, mesh, batches)
        cache_spec = P("data", None, None, None, "model")
    for i, run in enumerate(runs):
        H.assert_same_run(run, want[i], f"{name} {layout} replica {i}")
    # The step's outputs keep the rules' layouts: caches split over kv heads, logits over vocab.
    assert caches[0].sharding.spec == cache_spec
    assert caches[0].addressable_shards[0].data.shape[-2] == sharded.config.num_kv_heads // tp
    if tp > 1:
        assert logits.sharding.spec[-1] == "model"
        assert logits.addressable_shards[0].data.shape[-1] == config.vocab_size // tp


def test_fused_projections():
    """Phi-3's fused qkv/gate_up rows split over 8 shards (2 kv heads replicated to 8) still match."""
    if not H.supported("phi3"):
        pytest.skip("Phi3ForCausalLM is not registered yet")
    config, tensors, run = H.unsharded("phi3", seed=SEED)
    want = run(H.prompts(SEED + 3), seed=SEED)
    mesh = _mesh(1, 8)
    sharded = load_sharded(config, tensors, dtype=jnp.float32, mesh=mesh)
    qkv = named_params(sharded.model)["model.layers.0.self_attn.qkv_proj.weight"].get_value()
    assert qkv.addressable_shards[0].data.shape == (qkv.shape[0] // 8, qkv.shape[1])
    step = jax.jit(H.logits_step(sharded.model))
    weights = nnx.state(sharded.model)
    cache_sharding = rules.kv_cache_sharding(mesh)
    caches = tuple(jax.device_put(c, cache_sharding) for c in H.zero_caches(sharded.config))
    got = H.greedy(lambda ids, c, md: step(weights, ids, c, md), caches, H.prompts(SEED + 3), seed=SEED)
    H.assert_same_run(got, want, "phi3 tp8")


def _data_parallel(step, weights, sharded, mesh, batches):
    """Both replicas in one program, each on its own batch and cache."""
    dp_step = jax.jit(over_replicas(step, mesh))
    drivers = [H.GreedyDriver(b, seed=SEED + i) for i, b in enumerate(batches)]
    caches = tuple(
        jax.device_put(np.stack([c] * len(drivers)), rules.kv_cache_sharding(mesh, stacked=True))
        for c in H.zero_caches(sharded.config)
    )
    for s in range(H.DECODE_STEPS + 1):
        inputs = [d.next_inputs(s) for d in drivers]
        ids = put_stacked(stack([x.input_ids for x in inputs]), mesh)
        md = put_stacked(stack([x.md for x in inputs]), mesh)
        logits, caches = dp_step(weights, ids, caches, md)  # [R, T, V], L x [R, 2, P, S, K, H]
        for d, replica_logits in zip(drivers, unstack(logits), strict=True):
            d.take(replica_logits)
    return [d.run for d in drivers], logits, caches


_sample = jax.jit(sample, static_argnames=("all_greedy", "use_penalties", "num_top_logprobs"))


def test_sampling_on_vocab_sharded_logits():
    rng = np.random.default_rng(SEED)
    print(f"seed {SEED}")
    num_rows, vocab = 8, 256
    logits = rng.standard_normal((num_rows, vocab)).astype(np.float32)  # flat: draws rarely hit the argmax
    rows = [
        SamplingRow(SamplingParams(), seed=1, step=0),  # greedy
        SamplingRow(SamplingParams(temperature=0.8), seed=int(rng.integers(2**63)), step=3),
        SamplingRow(SamplingParams(temperature=1.2, top_k=20), seed=int(rng.integers(2**63)), step=0),
        SamplingRow(SamplingParams(temperature=1.0, top_p=0.7), seed=int(rng.integers(2**63)), step=5),
        SamplingRow(SamplingParams(temperature=0.9, typical_p=0.8), seed=int(rng.integers(2**63)), step=1),
        SamplingRow(SamplingParams(temperature=1.0, repetition_penalty=1.3, frequency_penalty=0.5),
                    seed=int(rng.integers(2**63)), step=2, token_ids=rng.integers(0, vocab, 12).tolist(),
                    num_prompt=8),
        SamplingRow(SamplingParams(repetition_penalty=2.0), seed=7, step=0,
                    token_ids=rng.integers(0, vocab, 6).tolist(), num_prompt=6),
    ]
    md = build_sampling_metadata(rows, num_rows, history_len=16)
    mesh = _mesh(1, 8)
    sharded_logits = jax.device_put(logits, rules.logits_sharding(mesh, vocab))
    assert sharded_logits.addressable_shards[0].data.shape == (num_rows, vocab // 8)
    for flags in (dict(all_greedy=True, use_penalties=False, num_top_logprobs=0),
                  dict(all_greedy=False, use_penalties=True, num_top_logprobs=4)):
        want = _sample(logits, md, **flags)
        got = _sample(sharded_logits, md, **flags)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
        np.testing.assert_array_equal(np.asarray(got.top_ids), np.asarray(want.top_ids))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.top_logprobs), np.asarray(want.top_logprobs), rtol=1e-5,
                                   atol=1e-5)
    # Not vacuous: the seeded rows drew something other than the argmax at least once.
    assert np.any(np.asarray(got.tokens) != logits.argmax(-1))
