"""LlamaForCausalLM against Hugging Face transformers (torch, CPU, float32) for every Llama variant.

Owns: tiny random-config parity checks (ragged prefill, chunked prefill, 16 greedy decode steps
through shuffled pages) and the registry/params error paths. Must not: download anything; HF
models are built from configs with fresh random weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.models.base import set_row_gemv  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.models.fuse import fold_norms, fuse_tensors, fused_config  # noqa: E402
from engine.models.params import assign_params, named_params  # noqa: E402
from engine.models.registry import (  # noqa: E402
    UnsupportedArchitectureError,
    build_abstract_model,
    build_model,
    config_from_hf,
    is_supported,
)
from engine.pallas_kernels.gemv_gpu import RowGemv  # noqa: E402
from engine.pallas_kernels.ragged_paged_attention.metadata import kv_cache_shape  # noqa: E402
from tests.engine.models.paged import TinyPagedEngine, model_step_fn  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
LLAMA3 = dict(rope_theta=500000.0, rope_scaling=dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=16,  # small, so positions in these tests are scaled
))
VARIANTS = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", LLAMA3),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA3, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-swa": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3-swa": ("Qwen3Config", "Qwen3ForCausalLM",
                  dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, attention_bias=True)),
    # Gemma: window 6 (shorter than the 11- and 19-token prompts), a softmax scale apart from
    # head_dim, and caps low enough that scores and logits run well into tanh's bend.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=5.0,
                    final_logit_softcapping=10.0)),
    # Gemma 3: local and (linearly scaled) global rotary; HF ignores attn_logit_softcapping here.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, num_hidden_layers=3,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters=dict(full_attention=dict(rope_type="linear", factor=4.0, rope_theta=5e4),
                                         sliding_attention=dict(rope_type="default", rope_theta=1e3)),
                    attn_logit_softcapping=5.0, final_logit_softcapping=10.0)),
    # SmolLM2's shape: G = 3, head_dim from hidden/heads, tied, theta 1e5.
    "smollm2": ("LlamaConfig", "LlamaForCausalLM",
                dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, rope_theta=100000.0,
                     tie_word_embeddings=True, vocab_size=300)),
    # Phi-3: fused qkv/gate_up, LongRoPE within its original length (short factors) with an explicit
    # attention factor. Long factors and partial rotary: test_moe.py.
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             dict(pad_token_id=0, rope_parameters=dict(rope_type="longrope", rope_theta=1e4, attention_factor=1.2,
                                                       short_factor=[1 + i / 8 for i in range(8)],
                                                       long_factor=[1 + i for i in range(8)]))),
}
PAGE_SIZE = 4
NUM_PAGES = 64
DECODE_STEPS = 16


@functools.cache
def _hf_model(variant: str):
    config_cls, arch, extra = VARIANTS[variant]
    cfg = getattr(transformers, config_cls)(**{**TINY, **extra}, architectures=[arch])
    torch.manual_seed(0)
    model = getattr(transformers, arch)._from_config(cfg, attn_implementation="eager").eval()
    # HF init (std 0.02) makes attention near-uniform and hides rope/mask bugs; use O(1) logits.
    unit_offset = arch.startswith("Gemma")  # its norms scale by 1 + weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if unit_offset else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
                p.copy_(gain * torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def _ours(hf_model, dtype=jnp.float32, *, fuse=False):
    """Our port with HF's weights; fuse: q/k/v and gate/up joined and the pre-norms folded into
    them, as the loader does."""
    config = config_from_hf(hf_model.config.to_dict())
    tensors = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if fuse:
        config = fused_config(config)
    model = build_abstract_model(config, dtype=dtype)
    if fuse:
        tensors = fold_norms(fuse_tensors(tensors, named_params(model), np.concatenate), config, np)
    assign_params(model, tensors, dtype)
    return config, model


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _hf_greedy(hf_model, prompt):
    """HF's logits over the prompt [n, V], and its greedy continuation with per-step logits."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        prefill = hf_model(ids).logits[0].numpy()
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=DECODE_STEPS + 1, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()  # [17]
    step_logits = np.stack([lg[0].numpy() for lg in out.logits])  # [17, V]; [0] is the prefill's
    return prefill, tokens, step_logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(variant):
    hf_model = _hf_model(variant)
    config, model = _ours(hf_model)
    hf_names = set(hf_model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    assert set(named_params(model)) == hf_names
    _check_parity(model, config, *_prompts_and_hf(hf_model, config))


# Fused on one GPU (engine.served_model): biases (Qwen3 here), q/k norms after the split, sandwich
# norms; the pre-norms (random weights, 1 + weight for Gemma) folded into the projections.
@pytest.mark.parametrize("variant", ["llama3.1", "qwen3-swa", "gemma3"])
def test_fused_projections_match_transformers(variant):
    hf_model = _hf_model(variant)
    config, model = _ours(hf_model, fuse=True)
    names = set(named_params(model))
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight", "input_layernorm.weight")) for n in names)
    mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    assert f"model.layers.1.{mlp_norm}.weight" not in names and "model.norm.weight" in names
    layer = "model.layers.1."
    assert {layer + "self_attn.qkv_proj.weight", layer + "mlp.gate_up_proj.weight"} <= names
    assert (layer + "self_attn.qkv_proj.bias" in names) == config.attention_bias
    _check_parity(model, config, *_prompts_and_hf(hf_model, config))


# A lone decode on one GPU: each layer's one-row step on the fused GEMV kernel (interpreted here),
# which takes the folded norms' 1/rms, rope, the residual adds and SiLU x up; Qwen2 adds q/k/v biases.
@pytest.mark.parametrize("variant", ["llama3.1", "qwen2"])
def test_one_row_steps_on_the_gemv_kernel_match_transformers(variant):
    hf_model = _hf_model(variant)
    config, model = _ours(hf_model, fuse=True)
    assert set_row_gemv(model, RowGemv(interpret=True)) == config.num_layers
    prompt = np.random.default_rng(3).integers(1, config.vocab_size, 13).tolist()
    prefill, tokens, step_logits = _hf_greedy(hf_model, prompt)
    step_fn = model_step_fn(model)
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=PAGE_SIZE, seed=4)
    caches = tuple(jnp.zeros(kv_cache_shape(NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim))
                   for _ in range(config.num_layers))
    step = engine.step([(0, prompt)], num_tokens=16, num_rows=2, max_pages=12)
    assert "gemv" not in str(jax.make_jaxpr(step_fn)(step.input_ids, caches, step.md))  # 16 rows: XLA
    logits, caches = step_fn(step.input_ids, caches, step.md)
    assert _rel(np.asarray(logits)[step.token_index[0]], prefill) < 1e-4
    for d in range(6):
        step = engine.step([(0, [tokens[d]])], num_tokens=1, num_rows=2, max_pages=12)
        if d == 0:  # four launches a layer, rope inside the q/k/v one
            jaxpr = str(jax.make_jaxpr(step_fn)(step.input_ids, caches, step.md))
            assert jaxpr.count("name=gemv") >= 4 * config.num_layers
            assert "name=gemv_rope" in jaxpr and "name=gemv_gated" in jaxpr
        logits, caches = step_fn(step.input_ids, caches, step.md)
        assert _rel(np.asarray(logits)[0], step_logits[d + 1]) < 1e-4, f"decode {d}"


@pytest.mark.parametrize("variant,layers", [("qwen3", 0), ("gemma3", 0), ("llama3.1", 2)])
def test_row_gemv_only_where_a_layer_fits_it(variant, layers):
    """q/k norms (Qwen3) and sandwich norms (Gemma 3) keep XLA's dots; so does an unfused model."""
    config, model = _ours(_hf_model(variant), fuse=True)
    assert set_row_gemv(model, RowGemv(interpret=True)) == layers
    assert set_row_gemv(_ours(_hf_model(variant))[1], RowGemv(interpret=True)) == 0


def _prompts_and_hf(hf_model, config, lengths=(11, 5, 19)):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]
    return prompts, [_hf_greedy(hf_model, p) for p in prompts]


def _check_parity(model, config, prompts, hf):
    """Ragged prefill of three prompts (a copy of the third in two chunks, the second riding along
    the first decode step) and 16 greedy decode steps, against HF's logits (_hf_greedy's)."""
    step_fn = model_step_fn(model)
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=PAGE_SIZE, seed=1)
    caches = tuple(jnp.zeros(kv_cache_shape(NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim))
                   for _ in range(config.num_layers))
    shape = dict(num_tokens=48, num_rows=6, max_pages=12)  # one bucket for every step: one compile

    # Ragged prefill of all prompts, plus the first chunk of a chunked copy of prompt 2.
    split = 8
    chunks = [(i, p) for i, p in enumerate(prompts)] + [("chunked", prompts[2][:split])]
    step = engine.step(chunks, **shape)
    logits, caches = step_fn(step.input_ids, caches, step.md)
    logits = np.asarray(logits)
    for i, (prefill, _, _) in enumerate(hf):
        assert _rel(logits[step.token_index[i]], prefill) < 1e-4, f"prefill of prompt {i}"
    first_chunk = logits[step.token_index[3]]

    # Greedy decode of every prompt (HF's tokens fed back), with the chunked prompt's second half
    # riding along in the first decode step.
    for d in range(DECODE_STEPS):
        chunks = [(i, [tokens[d]]) for i, (_, tokens, _) in enumerate(hf)]
        if d == 0:
            chunks.append(("chunked", prompts[2][split:]))
        step = engine.step(chunks, **shape)
        logits, caches = step_fn(step.input_ids, caches, step.md)
        logits = np.asarray(logits)
        for i, (_, _, step_logits) in enumerate(hf):
            assert _rel(logits[step.token_index[i]], step_logits[d + 1]) < 1e-4, f"decode {d} of {i}"
        if d == 0:
            chunked = np.concatenate([first_chunk, logits[step.token_index[3]]])
            assert _rel(chunked, hf[2][0]) < 1e-4, "chunked prefill"


def test_gemma_soft_caps_are_in_play():
    """The Gemma parity runs above only prove the caps right if the random models reach them."""
    hf_model = _hf_model("gemma2")
    ids = torch.tensor([np.random.default_rng(1).integers(1, 256, 19).tolist()])
    attns = [layer.self_attn for layer in hf_model.model.layers]
    with torch.no_grad():
        capped = hf_model(ids).logits[0]
        try:
            for a in attns:
                a.attn_logit_softcapping = None
            uncapped = hf_model(ids).logits[0]
        finally:
            for a in attns:
                a.attn_logit_softcapping = hf_model.config.attn_logit_softcapping
    final_cap = hf_model.config.final_logit_softcapping
    assert capped.abs().max() > 0.95 * final_cap  # tanh's flat end: 0.95 is tanh(1.83)
    assert _rel(uncapped.numpy(), capped.numpy()) > 1e-2, "attention scores never reach the cap"


@pytest.mark.parametrize("variant", ["llama3.2", "gemma3"])  # Gemma: its norms multiply in float32
def test_bfloat16_params_track_float32(variant):
    hf_model = _hf_model(variant)
    config, model = _ours(hf_model, jnp.bfloat16)
    assert all(p.get_value().dtype == jnp.bfloat16 for p in named_params(model).values())
    prompt = np.random.default_rng(0).integers(1, config.vocab_size, 12).tolist()
    engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=PAGE_SIZE, seed=2)
    caches = (jnp.zeros(kv_cache_shape(NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim),
                        jnp.bfloat16),) * config.num_layers
    step = engine.step([(0, prompt)], num_tokens=16, num_rows=2, max_pages=8)
    logits, _ = model_step_fn(model)(step.input_ids, caches, step.md)
    assert logits.dtype == jnp.float32
    with torch.no_grad():
        want = hf_model(torch.tensor([prompt])).logits[0].numpy()
    assert _rel(np.asarray(logits)[step.token_index[0]], want) < 5e-2


def test_unknown_architecture_is_named():
    with pytest.raises(UnsupportedArchitectureError) as err:
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "hidden_size": 64})
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in msg and is_supported(arch)
    assert not is_supported("GPT2LMHeadModel")
    with pytest.raises(UnsupportedArchitectureError, match="without `architectures`"):
        config_from_hf({"hidden_size": 64})


def test_config_from_hf_defaults_and_rope_spellings():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=64, intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, eos_token_id=[3, 4])
    legacy = config_from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(type="linear", factor=2.0)))
    v5 = config_from_hf(dict(base, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=5e5)))
    assert legacy == v5
    assert (v5.head_dim, v5.num_kv_heads, v5.eos_token_ids, v5.rope_theta) == (16, 4, (3, 4), 5e5)
    assert config_from_hf(dict(base, eos_token_id=2)).eos_token_ids == (2,)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf(dict(base, rope_scaling=dict(rope_type="yarn", factor=4.0)))
    with pytest.raises(ValueError, match="lacks `hidden_size`"):
        config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    qwen = config_from_hf(dict(base, architectures=["Qwen2ForCausalLM"], sliding_window=8))
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.sliding_window is None
    assert ModelConfig.from_hf(dict(base)) == config_from_hf(dict(base))


def test_gemma_config_spellings():
    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=7,
                num_attention_heads=4, head_dim=16, max_position_embeddings=64)
    g2 = config_from_hf(dict(base, architectures=["Gemma2ForCausalLM"]))  # HF's defaults where unsaid
    assert g2.layer_types == ("sliding_attention", "full_attention") * 3 + ("sliding_attention",)
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.sliding_window) == (50.0, 30.0, 4096)
    assert g2.tie_word_embeddings and g2.hidden_act == "gelu_pytorch_tanh" and g2.local_rope_theta is None
    # A Gemma 3 config.json from before transformers 5: theta pair, global-only scaling, a pattern.
    legacy = config_from_hf(dict(base, architectures=["Gemma3ForCausalLM"], rope_theta=1e6, sliding_window=4,
                                 rope_local_base_freq=1e4, rope_scaling=dict(rope_type="linear", factor=8.0),
                                 sliding_window_pattern=3, attn_logit_softcapping=20.0))
    v5 = config_from_hf(dict(base, architectures=["Gemma3ForCausalLM"], sliding_window=4,
                             rope_parameters=dict(
                                 full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                                 sliding_attention=dict(rope_type="default", rope_theta=1e4))))
    assert legacy == dataclasses.replace(v5, layer_types=legacy.layer_types)
    assert legacy.layer_types[:3] == ("sliding_attention", "sliding_attention", "full_attention")
    assert v5.layer_types[5] == "full_attention" and v5.attn_logit_softcap is None and v5.qk_norm
    assert [v5.rope_of(i)[0] for i in (0, 5)] == [1e4, 1e6] and v5.rope_of(5)[1].factor == 8.0
    with pytest.raises(ValueError, match="per layer type"):
        config_from_hf(dict(base, architectures=["Gemma3ForCausalLM"], rope_parameters=dict(rope_theta=1e4)))
    with pytest.raises(ValueError, match="bidirectional"):
        config_from_hf(dict(base, architectures=["Gemma3ForCausalLM"], use_bidirectional_attention=True))
    with pytest.raises(UnsupportedArchitectureError, match="vision tower.*Gemma3ForCausalLM"):
        config_from_hf(dict(base, architectures=["Gemma3ForConditionalGeneration"]))


def test_assign_params_reports_every_problem():
    config = config_from_hf(dict(architectures=["LlamaForCausalLM"], **TINY, tie_word_embeddings=True))
    model = build_model(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    good = {n: np.zeros(p.shape, np.float32) for n, p in named_params(model).items()}
    assert "lm_head.weight" not in good  # tied: the embedding is the output projection
    # Harmless extras are ignored: rotary buffers, and a tied checkpoint's copy of the embedding.
    extras = {"model.rotary_emb.inv_freq": np.zeros(8), "lm_head.weight": np.zeros((256, 64))}
    assign_params(model, {**good, **extras}, jnp.bfloat16)
    assert model.model.norm.weight.get_value().dtype == jnp.bfloat16

    bad = dict(good)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 63), np.float32)
    bad["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    with pytest.raises(ValueError) as err:
        assign_params(model, bad, jnp.float32)
    msg = str(err.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.self_attn.q_proj.bias" in msg
    assert "model.layers.0.self_attn.q_proj.weight: expected (64, 64), got (64, 63)" in msg
    # Nothing was written by the failed call.
    assert model.model.norm.weight.get_value().dtype == jnp.bfloat16
