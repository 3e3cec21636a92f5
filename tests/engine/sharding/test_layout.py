"""The sharding table, kv-head replication, meshes, the layout report and the flags, piece by piece.

Owns: every registered family's parameters having a rule; unknown names and impossible layouts
failing with messages that say what to change; replicated kv heads leaving the model's outputs
unchanged (including Phi-3's fused qkv and a head count needing lcm(K, tp) heads); mesh
construction and its errors; the per-device byte counts; the CLI flags. Must not: run sharded
decode loops (test_sharded_model.py does).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.sharding import PartitionSpec as P

from engine.cli import add_engine_flags, engine_config
from engine.models.params import named_params
from engine.models.registry import build_abstract_model, config_from_hf, supported_architectures
from engine.sharding import rules
from engine.sharding.config import LayoutError, ShardingConfig
from engine.sharding.kv_heads import plan_kv_heads, replicate_kv_heads, sharded_config
from engine.sharding.load import (
    abstract_sharded_model,
    check_fits,
    layout_report,
    load_sharded,
)
from engine.sharding.mesh import describe_mesh, make_mesh
from tests.engine.sharding import harness as H

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=64)
FAMILY_EXTRAS = {  # what each family's config needs beyond TINY to build
    "Gemma3ForCausalLM": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64),
    "Qwen3MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}
_HF_CONFIG = {"Gemma3ForCausalLM": "Gemma3TextConfig"}


def _mesh(tp: int, dp: int = 1):
    return make_mesh(ShardingConfig(tensor_parallel=tp, data_parallel=dp), jax.devices()[: tp * dp])


def _family_config(arch: str):
    cls = getattr(transformers, _HF_CONFIG.get(arch, arch.replace("ForCausalLM", "Config")))
    hf = cls(**TINY, **FAMILY_EXTRAS.get(arch, {}), architectures=[arch]).to_dict()
    return config_from_hf(hf)


@pytest.mark.parametrize("arch", supported_architectures())
def test_every_family_has_rules_and_splits_its_matrices(arch):
    sharded = abstract_sharded_model(_family_config(arch), dtype=jnp.float32, mesh=_mesh(4))
    params = {n: p.get_value() for n, p in named_params(sharded.model).items()}
    for name, value in params.items():
        spec = value.sharding.spec
        # Every weight matrix (and stacked expert tensor) is split, except the MoE router and
        # Qwen2-MoE's one-row shared-expert gate, which are too small to be worth it.
        if value.ndim >= 2 and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            assert "model" in tuple(spec), f"{arch}: {name} {spec} is not split"
        if name.endswith("norm.weight"):
            assert spec == P(), name


def test_unknown_and_misshapen_params_fail_loudly():
    mesh = _mesh(2)
    unknown = r"engine/sharding/rules.py for: model\.layers\.0\.mystery\.weight \(an unknown"
    with pytest.raises(rules.UnknownParamError, match=unknown):
        rules.param_shardings({"model.layers.0.mystery.weight": (4, 4), "model.norm.weight": (4,)}, mesh)
    with pytest.raises(rules.UnknownParamError, match="has 3 dimensions"):
        rules.param_shardings({"model.layers.0.self_attn.q_proj.weight": (2, 4, 4)}, mesh)


def test_uneven_splits():
    mesh = _mesh(4)
    shapes = {"lm_head.weight": (250, 64), "model.layers.0.mlp.up_proj.weight": (128, 64)}
    shardings = rules.param_shardings(shapes, mesh)
    assert shardings["lm_head.weight"].spec == P()  # an optional split falls back to whole
    assert rules.unsplit_params(shapes, mesh) == ["lm_head.weight"]
    with pytest.raises(LayoutError, match=r"up_proj\.weight \(126, 64\).*126 cannot be split evenly over 4"):
        rules.param_shardings({"model.layers.0.mlp.up_proj.weight": (126, 64)}, mesh)
    assert rules.logits_sharding(mesh, 250).spec == P()
    assert rules.logits_sharding(mesh, 256).spec == P(None, "model")
    assert rules.kv_cache_sharding(_mesh(4, 2), stacked=True).spec == P("data", None, None, None, "model")


@pytest.mark.parametrize("heads,kv,tp,want", [(8, 2, 4, 4), (8, 2, 8, 8), (8, 4, 2, 4), (12, 6, 4, 12),
                                              (8, 8, 8, 8), (6, 1, 3, 3), (12, 4, 6, 12)])
def test_kv_head_plans(heads, kv, tp, want):
    config = H.model_config("llama")
    config = type(config)(**{**config.__dict__, "num_heads": heads, "num_kv_heads": kv})
    assert plan_kv_heads(config, tp).sharded_kv_heads == want


def test_kv_head_refusal_names_working_shard_counts():
    config = H.model_config("llama")  # 8 heads, 2 kv heads
    expected = r"8 attention heads, which --num-shard 3 cannot split.*\[1, 2, 4, 8\]$"
    with pytest.raises(LayoutError, match=expected):
        plan_kv_heads(config, 3)


def _prefill_logits(config, tensors, prompt_ids):
    model = H.reference_model(config, tensors)
    step = jax.jit(H.logits_step(model))
    driver = H.GreedyDriver(prompt_ids, seed=0)
    inputs = driver.next_inputs(0)
    from flax import nnx

    logits, _ = step(nnx.state(model), inputs.input_ids, H.zero_caches(config), inputs.md)
    return np.concatenate([np.asarray(logits)[i] for i in inputs.token_index])


@pytest.mark.parametrize("case", ["llama-kv2-tp8", "lcm-kv6-tp4", "phi3-fused-kv2-tp4"])
def test_replicated_kv_heads_keep_the_math(case):
    rng_seed = int(np.random.SeedSequence().entropy % 2**31)
    if case == "llama-kv2-tp8":
        config, tp = H.model_config("llama"), 8
    elif case == "lcm-kv6-tp4":
        config = config_from_hf(dict(H.LLAMA, num_attention_heads=12, num_key_value_heads=6, head_dim=8))
        tp = 4
    else:
        config = config_from_hf(dict(H.LLAMA, architectures=["Phi3ForCausalLM"], attention_bias=False))
        tp = 4
    plan = plan_kv_heads(config, tp)
    assert plan.copies > 1
    tensors = H.random_tensors(config, rng_seed)
    replicated = replicate_kv_heads(tensors, plan, num_heads=config.num_heads, head_dim=config.head_dim)
    prompt_ids = H.prompts(rng_seed, (9, 4))
    want = _prefill_logits(config, tensors, prompt_ids)
    got = _prefill_logits(sharded_config(config, plan), replicated, prompt_ids)
    assert H.rel(got, want) < 1e-5, f"seed {rng_seed}"
    # And a wrong mapping (heads tiled instead of repeated in place) would have been caught.
    k = next(n for n in tensors if n.endswith(("k_proj.weight", "qkv_proj.weight")))
    assert not np.array_equal(replicated[k], np.tile(tensors[k], (plan.copies, 1)))


def test_mesh_layouts_and_errors():
    mesh = _mesh(4, 2)
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (2, 4)
    assert [d.id for d in mesh.devices[1]] == [4, 5, 6, 7]
    text = describe_mesh(mesh)
    assert "data=2 x model=4 over 8 cpu devices on 1 host" in text and "replica 1: devices 4,5,6,7" in text
    assert make_mesh(ShardingConfig(data_parallel=2)).devices.shape == (2, 4)  # auto tp: all devices
    assert make_mesh(ShardingConfig(tensor_parallel=2)).devices.shape == (1, 2)  # a subset, as TGI
    with pytest.raises(LayoutError, match="needs 16 devices, but only 8 are visible"):
        make_mesh(ShardingConfig(tensor_parallel=8, data_parallel=2))
    with pytest.raises(LayoutError, match="does not divide the 8 visible devices"):
        make_mesh(ShardingConfig(data_parallel=3))
    for bad, msg in ((dict(tensor_parallel=0), "--num-shard must be >= 1"),
                     (dict(process_id=2, num_processes=2), "out of range"),
                     (dict(coordinator_address="host"), "host:port")):
        with pytest.raises(LayoutError, match=msg):
            ShardingConfig(**bad)


def test_report_counts_each_devices_bytes():
    config = H.model_config("llama")
    tensors = H.random_tensors(config, 0)
    sharded = load_sharded(config, tensors, dtype=jnp.float32, mesh=_mesh(4))
    on_device0 = sum(
        s.data.nbytes
        for p in named_params(sharded.model).values()
        for s in p.get_value().addressable_shards
        if s.device == jax.devices()[0]
    )
    report = layout_report(sharded, kv_dtype=jnp.float32, memory_fraction=0.5, device_bytes=2**30)
    assert report.weight_bytes_per_device == on_device0
    assert on_device0 < sum(t.nbytes for t in tensors.values()) / 2  # really split
    # 2 layers x K and V x 1 kv head per device (2 heads replicated to 4, over 4) x 16 x 4 bytes
    assert report.kv_bytes_per_token == 2 * 2 * 1 * 16 * 4
    assert report.kv_capacity_tokens == (2**29 - on_device0) // report.kv_bytes_per_token
    text = str(report)
    assert "kv heads: 2 replicated to 4" in text and "per device" in text and "replica 0" in text
    check_fits(report, min_kv_tokens=1024)
    tight = layout_report(sharded, kv_dtype=jnp.float32, memory_fraction=0.5, device_bytes=on_device0)
    with pytest.raises(LayoutError, match="weights need .* per device, more than .*--num-shard"):
        check_fits(tight, min_kv_tokens=1)
    roomy = layout_report(sharded, kv_dtype=jnp.float32, memory_fraction=1.0, device_bytes=on_device0 + 1000)
    with pytest.raises(LayoutError, match="room for 3 tokens of KV cache, fewer than the 64"):
        check_fits(roomy, min_kv_tokens=64)


def test_cli_flags_and_env(monkeypatch):
    monkeypatch.setenv("NUM_SHARD", "4")
    monkeypatch.setenv("COORDINATOR_ADDRESS", "10.0.0.1:1234")
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    cfg = engine_config(parser.parse_args(["--data-parallel-size", "2", "--num-processes", "2",
                                           "--process-id", "1"])).sharding
    assert cfg == ShardingConfig(tensor_parallel=4, data_parallel=2, coordinator_address="10.0.0.1:1234",
                                 num_processes=2, process_id=1)
    assert engine_config(parser.parse_args(["--num-shard", "2"])).sharding.tensor_parallel == 2
    with pytest.raises(LayoutError, match="--data-parallel-size must be >= 1"):
        engine_config(parser.parse_args(["--data-parallel-size", "0"]))


def test_abstract_model_is_unallocated_but_laid_out():
    sharded = abstract_sharded_model(H.model_config("llama"), dtype=jnp.bfloat16, mesh=_mesh(8))
    value = named_params(sharded.model)["model.layers.1.self_attn.v_proj.weight"].get_value()
    assert isinstance(value, jax.ShapeDtypeStruct) and value.dtype == jnp.bfloat16
    assert value.sharding.shard_shape(value.shape) == (16, 64)  # one of 8 replicated kv heads
    assert build_abstract_model(sharded.config, dtype=jnp.float32) is not None
