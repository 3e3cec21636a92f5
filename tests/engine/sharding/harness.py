"""Shared by the sharding tests and the multi-host worker: tiny configs, random checkpoints, greedy runs.

Owns: tiny configs (a Llama with fewer kv heads than shards, a Qwen2-MoE with a shared expert and
a dense layer, a Phi-3 with fused projections), random checkpoint tensors in HF names and layout, the unsharded reference, and
a greedy prefill + decode driver over TinyPagedEngine that any step function can run. Must not:
shard anything itself (the code under test does) or hide padding (TinyPagedEngine always pads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.models.config import ModelConfig
from engine.models.params import assign_params, named_params
from engine.models.registry import build_abstract_model, config_from_hf, is_supported
from engine.pallas_kernels.ragged_paged_attention.metadata import kv_cache_shape
from tests.engine.models.paged import TinyPagedEngine

# 8 query heads over 2 kv heads: 4 and 8 shards need kv heads replicated. Biased q/k/v/o, untied.
LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
             num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             attention_bias=True, max_position_embeddings=256, tie_word_embeddings=False)
# 8 experts (top-2) of width 32, a shared expert, layer 1 dense; 4 kv heads; tied embeddings.
MOE = dict(architectures=["Qwen2MoeForCausalLM"], vocab_size=256, hidden_size=64, intermediate_size=128,
           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
           mlp_only_layers=[1], tie_word_embeddings=True)
# Phi-3: fused qkv_proj and gate_up_proj, whose rows split across shards mid-q/k/v and mid-gate/up.
PHI3 = dict(LLAMA, architectures=["Phi3ForCausalLM"], attention_bias=False)
CONFIGS = {"llama": LLAMA, "moe": MOE, "phi3": PHI3}

PAGE_SIZE = 4
NUM_PAGES = 48
SHAPE = dict(num_tokens=48, num_rows=4, max_pages=12)  # one bucket for every step: one compile
DECODE_STEPS = 8


def supported(name: str) -> bool:
    return is_supported(CONFIGS[name]["architectures"][0])


def model_config(name: str) -> ModelConfig:
    return config_from_hf(CONFIGS[name])


def random_tensors(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """A checkpoint in HF names and layout with O(1) logits: norms and biases far from 1 and 0, so a
    tensor landing in the wrong place (or a kv head read by the wrong query heads) shows."""
    model = build_abstract_model(config, dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    out = {}
    for name, param in named_params(model).items():
        shape = tuple(param.get_value().shape)
        x = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("norm.weight"):
            x = 1 + 0.2 * x
        elif name.endswith("bias"):
            x = 0.3 * x
        elif "embed_tokens" not in name:
            gain = 2.0 if ("q_proj" in name or "k_proj" in name or name.endswith("gate.weight")) else 1.0
            x = gain * x / np.sqrt(shape[-1])
        out[name] = x
    return out


def reference_model(config: ModelConfig, tensors: dict[str, np.ndarray]):
    """The unsharded model on the default device, loaded the way the single-device loader does."""
    model = build_abstract_model(config, dtype=jnp.float32)
    assign_params(model, tensors, jnp.float32)
    return model


def prompts(seed: int, lengths: Sequence[int] = (11, 5, 17)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, n).tolist() for n in lengths]


def zero_caches(config: ModelConfig) -> tuple[np.ndarray, ...]:
    shape = kv_cache_shape(NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    return tuple(np.zeros(shape, np.float32) for _ in range(config.num_layers))


@dataclasses.dataclass
class Run:
    """One greedy run: per step, the logits of every real token [n, V] and the tokens chosen."""

    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)


class GreedyDriver:
    """Prefills the prompts in one ragged step, then decodes every request greedily, step by step.

    The step function is called with host inputs and returns (logits [T, V], caches); the driver
    only builds inputs and reads logits, so the same driver feeds one replica, many, or many hosts.
    """

    def __init__(self, prompt_ids: list[list[int]], *, seed: int) -> None:
        self.engine = TinyPagedEngine(num_pages=NUM_PAGES, page_size=PAGE_SIZE, seed=seed)
        self.prompts = prompt_ids
        self.run = Run()
        self._step = None

    def next_inputs(self, num_steps_done: int):
        if num_steps_done == 0:
            chunks = list(enumerate(self.prompts))
        else:
            chunks = [(i, [t]) for i, t in enumerate(self.run.tokens[-1])]
        self._step = self.engine.step(chunks, **SHAPE)
        return self._step

    def take(self, logits: np.ndarray) -> None:
        logits = np.asarray(logits)
        idx = self._step.token_index
        self.run.logits.append(np.concatenate([logits[i] for i in idx]))
        self.run.tokens.append([int(np.argmax(logits[i[-1]])) for i in idx])


def greedy(step_fn: Callable, caches, prompt_ids: list[list[int]], *, seed: int) -> Run:
    driver = GreedyDriver(prompt_ids, seed=seed)
    for s in range(DECODE_STEPS + 1):
        step = driver.next_inputs(s)
        logits, caches = step_fn(step.input_ids, caches, step.md)
        driver.take(logits)
    return driver.run


def logits_step(model) -> Callable:
    """(weights, input_ids, caches, md) -> (logits [T, V], caches), to be jitted by the caller."""
    graphdef = nnx.graphdef(model)

    def step(weights, input_ids, caches, md):
        m = nnx.merge(graphdef, weights)
        hidden, caches = m(input_ids, caches, md)
        return m.compute_logits(hidden), caches

    return step


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_same_run(ours: Run, ref: Run, what: str, tol: float = 1e-4) -> None:
    assert ours.tokens == ref.tokens, f"{what}: greedy tokens differ"
    for i, (a, b) in enumerate(zip(ours.logits, ref.logits, strict=True)):
        err = rel(a, b)
        assert err < tol, f"{what}: step {i} logits rel err {err:.2e}"


def unsharded(name: str, *, seed: int) -> tuple[ModelConfig, dict[str, np.ndarray], Callable]:
    """(config, checkpoint tensors, greedy(prompts, seed) -> Run) of the unsharded reference."""
    config = model_config(name)
    tensors = random_tensors(config, seed)
    model = reference_model(config, tensors)
    step = jax.jit(logits_step(model))
    weights = nnx.state(model)

    def run(prompt_ids: list[list[int]], *, seed: int) -> Run:
        def step_fn(ids, caches, md):
            return step(weights, ids, caches, md)

        return greedy(step_fn, zero_caches(config), prompt_ids, seed=seed)

    return config, tensors, run


HF_VOCAB = 512


def save_hf_checkpoint(directory, seed: int):
    """A Llama with 8 query heads over 2 kv heads (4 and 8 shards replicate them) saved HF-style with a
    tokenizer, for tests that load it the way a server does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.engine.models.checkpoints import save_spread_model

    config = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    save_spread_model(directory, LlamaForCausalLM, config, seed=seed, std=0.4)
    return directory

