"""Mixtral, Qwen2-MoE, Qwen3-MoE and Phi-3 against transformers, loaded from on-disk checkpoints.

Owns: parity of the MoE families and Phi-3 (LongRoPE, short and long factors, partial rotary, fused
projections) with HF through ragged prefill, chunked prefill and 16 paged decode steps, with every
model read by the real loader from what transformers' save_pretrained writes (per-expert tensors,
as on the Hub); the grouped-matmul dispatch against a per-token reference; and the checkpoint
layout's stacking and errors. Must not: download anything.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.models import checkpoint_layout as cl  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.models.layers.moe import SparseMoE, route  # noqa: E402
from engine.models.loader import ModelLoadError, load_model  # noqa: E402
from engine.models.params import named_params  # noqa: E402
from engine.models.registry import config_from_hf  # noqa: E402
from tests.engine.models.checkpoints import save_tokenizer  # noqa: E402
from tests.engine.models.test_llama_family import (  # noqa: E402
    _check_parity,
    _hf_greedy,
    _prompts_and_hf,
)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _longrope(n: int, **kw) -> dict:
    return dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.1 * i for i in range(n)],
                long_factor=[1.0 + 3.0 * i for i in range(n)], **kw)


# name: (config class, architecture, overrides, prompt lengths, max_model_len we load with)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8), (11, 5, 19), None),
    # A shared expert, un-normalized top-k, and a dense middle layer through mlp_only_layers.
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=3, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48,
                       shared_expert_intermediate_size=80, mlp_only_layers=[1]), (11, 5, 19), None),
    # Layer 0 dense through decoder_sparse_step; q/k norms; renormalized top-3 of 5.
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=True,
                       decoder_sparse_step=2, head_dim=24), (11, 5, 19), None),
    # Served past original_max_position_embeddings (8): long factors, and prompts already longer
    # than 8, which is when HF uses them too. Half the head rotated; sqrt(2) attention factor from
    # the lengths. (Short factors: the "phi3" variant of test_llama_family.)
    "phi3-long": ("Phi3Config", "Phi3ForCausalLM",
                  dict(max_position_embeddings=64, original_max_position_embeddings=8, sliding_window=12,
                       rope_parameters=_longrope(4, partial_rotary_factor=0.5)), (11, 9, 19), None),
}


@functools.cache
def _hf_model(name: str):
    config_cls, arch, extra, _, _ = FAMILIES[name]
    cfg = getattr(transformers, config_cls)(**{**TINY, **extra}, architectures=[arch])
    torch.manual_seed(0)
    model = getattr(transformers, arch)._from_config(cfg, attn_implementation="eager").eval()
    # O(1) activations and router logits (HF's std 0.02 would make routing near-uniform).
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in pname:
                p.copy_(torch.randn_like(p))
            else:  # [out, in] or stacked [E, out, in]
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@functools.cache
def _checkpoint(name: str, root):
    """The HF model saved by save_pretrained (per-expert tensors, as on the Hub) with a tokenizer."""
    directory = root / name
    hf_model = _hf_model(name)
    hf_model.save_pretrained(directory)
    save_tokenizer(directory, hf_model.config.vocab_size)
    return directory


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-checkpoints")


def _hf_greedy_and_routing(hf_model, prompt):
    """_hf_greedy, plus per sparse layer the experts HF's router picked for the prompt's tokens."""
    picked, hooks = [], []
    for module in hf_model.modules():
        if type(module).__name__.endswith("TopKRouter"):  # output: (logits, weights, experts)
            hooks.append(module.register_forward_hook(lambda m, i, out: picked.append(out[2].numpy())))
    try:
        greedy = _hf_greedy(hf_model, prompt)
    finally:
        for h in hooks:
            h.remove()
    num_sparse = len(hooks)
    return greedy, picked[:num_sparse]  # the first forward is the prompt's


@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_transformers_from_disk(name, ckpt_root):
    hf_model = _hf_model(name)
    *_, lengths, max_model_len = FAMILIES[name]
    loaded = load_model(str(_checkpoint(name, ckpt_root)), dtype="float32", max_model_len=max_model_len)
    config, model = loaded.config, loaded.model
    # Our parameter names are transformers' own (in-memory) state_dict names.
    assert set(named_params(model)) == set(hf_model.state_dict())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]
    hf, routing = zip(*(_hf_greedy_and_routing(hf_model, p) for p in prompts), strict=True)
    if config.num_experts:  # the prompts exercise routing: several experts each, all of them overall
        assert len(routing[0]) == sum(config.is_moe_layer(i) for i in range(config.num_layers))
        assert all(len(np.unique(experts)) > 1 for per_prompt in routing for experts in per_prompt)
        used = {int(e) for per_prompt in routing for experts in per_prompt for e in experts.ravel()}
        assert used == set(range(config.num_experts))

    _check_parity(model, config, prompts, hf)


def test_fused_projections_from_disk(ckpt_root):
    """Qwen2-MoE fused by the loader (as on one GPU): the dense layer's gate/up and every q/k/v join
    on the host with the norm before them folded in, while the experts keep their stacks, the shared
    expert its own matrices and the sparse layers the norm before their router."""
    hf_model = _hf_model("qwen2-moe")
    loaded = load_model(str(_checkpoint("qwen2-moe", ckpt_root)), dtype="float32", fuse_projections=True)
    config, model = loaded.config, loaded.model
    assert config.fused_qkv and config.fused_gate_up
    params = {n: np.asarray(p.get_value()) for n, p in named_params(model).items()}
    hf_state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    for i in range(config.num_layers):
        attn = f"model.layers.{i}.self_attn."
        gamma = hf_state[f"model.layers.{i}.input_layernorm.weight"]
        want = np.concatenate([hf_state[f"{attn}{p}_proj.weight"] for p in "qkv"]) * gamma
        np.testing.assert_allclose(params[f"{attn}qkv_proj.weight"], want, rtol=1e-6)
        want = np.concatenate([hf_state[f"{attn}{p}_proj.bias"] for p in "qkv"])
        np.testing.assert_array_equal(params[f"{attn}qkv_proj.bias"], want)
        assert f"model.layers.{i}.input_layernorm.weight" not in params
    dense = "model.layers.1.mlp."
    gamma = hf_state["model.layers.1.post_attention_layernorm.weight"]
    np.testing.assert_allclose(params[dense + "gate_up_proj.weight"], gamma * np.concatenate(
        [hf_state[dense + "gate_proj.weight"], hf_state[dense + "up_proj.weight"]]), rtol=1e-6)
    assert "model.layers.1.post_attention_layernorm.weight" not in params
    assert "model.layers.0.post_attention_layernorm.weight" in params  # sparse: feeds the router
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in params
    assert "model.layers.0.mlp.experts.gate_up_proj" in params
    assert not any(n.endswith((".q_proj.weight", ".k_proj.weight", ".v_proj.weight")) for n in params)
    _check_parity(model, config, *_prompts_and_hf(hf_model, config))


def _moe_config(**kw) -> ModelConfig:
    base = dict(architecture="Qwen2MoeForCausalLM", vocab_size=8, hidden_size=32, intermediate_size=16,
                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
                moe_intermediate_size=24)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("normalize,shared", [(False, 40), (True, 0)])
def test_grouped_dispatch_equals_per_token_experts(normalize, shared):
    config = _moe_config(norm_topk_prob=normalize, shared_expert_intermediate_size=shared)
    moe = SparseMoE(config, dtype=jnp.float32, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    # Inputs with positive entries and a negative router row for expert 4: it never wins, and its
    # empty group must not upset the dispatch.
    gate = moe.gate.weight.get_value() * 3
    moe.gate.weight.set_value(gate.at[4].set(-10.0))
    graphdef, state = nnx.split(moe)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    used = set()
    for t in (37, 37, 5):  # a second routing reuses the first program; 5 tokens is a new bucket
        x = np.abs(np.random.default_rng().normal(size=(t, 32))).astype(np.float32)
        got = np.asarray(fn(state, jnp.asarray(x)))
        weights, experts = map(np.asarray, route(jnp.asarray(x) @ moe.gate.weight.get_value().T, 2,
                                                 normalize=normalize))
        assert 4 not in experts
        used.update(np.unique(experts).tolist())
        if normalize:
            np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
        gu, down = (np.asarray(w.get_value()) for w in (moe.experts.gate_up_proj, moe.experts.down_proj))
        want = np.zeros_like(x)
        for i in range(t):
            for w, e in zip(weights[i], experts[i], strict=True):
                g, u = np.split(gu[e] @ x[i], 2)
                want[i] += w * (down[e] @ (g / (1 + np.exp(-g)) * u))
        if shared:
            sh = moe.shared_expert
            wg, wu, wd, ws = (np.asarray(m.weight.get_value()) for m in (
                sh.gate_proj, sh.up_proj, sh.down_proj, moe.shared_expert_gate))
            g, u = x @ wg.T, x @ wu.T
            want += ((g / (1 + np.exp(-g)) * u) @ wd.T) / (1 + np.exp(-(x @ ws.T)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Over the three batches (not within 5 same-signed tokens, which may all pick one pair).
    assert len(used) > 2
    assert fn._cache_size() == 2


def test_route_is_softmax_over_top_k_when_normalized():
    logits = jnp.asarray(np.random.default_rng().normal(size=(9, 7)), jnp.float32)
    weights, experts = route(logits, 3, normalize=True)
    top = np.take_along_axis(np.asarray(logits), np.asarray(experts), axis=-1)
    np.testing.assert_allclose(weights, jax.nn.softmax(top, axis=-1), rtol=1e-6)
    raw, _ = route(logits, 3, normalize=False)
    top3 = np.sort(jax.nn.softmax(logits, axis=-1), axis=-1)[:, ::-1][:, :3]
    np.testing.assert_allclose(raw, top3, rtol=1e-6)


def _mixtral_tensors(num_experts=3, rng=None):
    rng = rng or np.random.default_rng()
    t = {"model.layers.0.block_sparse_moe.gate.weight": rng.normal(size=(num_experts, 4))}
    for e in range(num_experts):
        for part, shape in (("w1", (6, 4)), ("w2", (4, 6)), ("w3", (6, 4))):
            t[f"model.layers.0.block_sparse_moe.experts.{e}.{part}.weight"] = rng.normal(size=shape)
    return t


def test_layout_stacks_experts_and_passes_stacked_checkpoints_through():
    t = _mixtral_tensors()
    out = cl.convert(cl.layout_for("MixtralForCausalLM"), t)
    assert set(out) == {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.gate_up_proj",
                        "model.layers.0.mlp.experts.down_proj"}
    gate_up = out["model.layers.0.mlp.experts.gate_up_proj"]  # [E, 2F, D]: gate rows, then up rows
    down = out["model.layers.0.mlp.experts.down_proj"]  # [E, D, F]
    assert gate_up.shape == (3, 12, 4)
    for e in range(3):
        expert = f"model.layers.0.block_sparse_moe.experts.{e}"
        np.testing.assert_array_equal(gate_up[e, :6], t[f"{expert}.w1.weight"])
        np.testing.assert_array_equal(gate_up[e, 6:], t[f"{expert}.w3.weight"])
        np.testing.assert_array_equal(down[e], t[f"{expert}.w2.weight"])
    # Already stacked (transformers 5 in-memory names): unchanged. Dense families: identity.
    assert cl.convert(cl.layout_for("MixtralForCausalLM"), out).keys() == out.keys()
    assert cl.convert(cl.layout_for("LlamaForCausalLM"), t).keys() == t.keys()


def test_layout_errors_name_the_tensors():
    layout = cl.layout_for("MixtralForCausalLM")
    t = _mixtral_tensors(4)
    del t["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    with pytest.raises(ValueError, match=r"experts\.\*\.\{w1,w3\}.*no w3 tensor for expert\(s\) 2"):
        cl.convert(layout, t)
    t = _mixtral_tensors(2)
    t["model.layers.0.block_sparse_moe.experts.1.w1.weight"] = np.zeros((5, 4))
    with pytest.raises(ValueError, match="w1 tensors are not all 2D of one shape"):
        cl.convert(layout, t)
    t = _mixtral_tensors(2)
    t["model.layers.0.mlp.gate.weight"] = t["model.layers.0.block_sparse_moe.gate.weight"]
    with pytest.raises(ValueError, match="both map to parameter model.layers.0.mlp.gate.weight"):
        cl.convert(layout, t)


def test_loader_reports_a_checkpoint_with_a_missing_or_extra_expert(ckpt_root, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _checkpoint("qwen3-moe", ckpt_root)
    experts = "model.layers.1.mlp.experts"
    for edit, message in (
        (lambda t: t.pop(f"{experts}.3.up_proj.weight"), r"no up_proj tensor for expert\(s\) 3"),
        # One expert too many: stacked, it no longer fits the config's 5.
        (lambda t: t.update({f"{experts}.5.{p}.weight": t[f"{experts}.0.{p}.weight"]
                             for p in ("gate_proj", "up_proj", "down_proj")}),
         r"stacked from .* has shape \(6, .* implies \(5, "),
    ):
        bad = tmp_path / f"bad{len(message)}"
        bad.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        tensors = load_file(src / "model.safetensors")
        edit(tensors)
        save_file(tensors, bad / "model.safetensors")
        with pytest.raises(ModelLoadError, match=message):
            load_model(str(bad), dtype="float32")


def test_config_reads_moe_and_longrope_fields():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=4096)
    hub_qwen3 = config_from_hf(dict(base, architectures=["Qwen3MoeForCausalLM"], num_experts=8,
                                    num_experts_per_tok=2, moe_intermediate_size=4, norm_topk_prob=True,
                                    decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [hub_qwen3.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    assert hub_qwen3.num_experts == 8 and hub_qwen3.norm_topk_prob and hub_qwen3.qk_norm
    # Early Phi-3 long-context configs call LongRoPE "su"; factor and attention factor from lengths.
    phi = config_from_hf(dict(base, architectures=["Phi3ForCausalLM"], max_position_embeddings=131072,
                              original_max_position_embeddings=4096, rope_scaling=dict(
                                  type="su", short_factor=[1.0] * 8, long_factor=[2.0] * 8)))
    rs = phi.rope_scaling
    assert (rs.rope_type, rs.factor, phi.fused_qkv, phi.fused_gate_up) == ("longrope", 32.0, True, True)
    assert rs.attention_factor == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    with pytest.raises(ValueError, match="needs 8"):
        config_from_hf(dict(base, architectures=["Phi3ForCausalLM"], rope_scaling=dict(
            type="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4)))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        config_from_hf(dict(base, architectures=["MixtralForCausalLM"], num_local_experts=2,
                            num_experts_per_tok=3))
