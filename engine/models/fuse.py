"""Fused projections for any family: q/k/v as one `qkv_proj`, gate/up as one `gate_up_proj`, and
the weights of the norms before them folded into their columns.

Owns: the config of the fused model, and turning a checkpoint's separate tensors (by HF name, numpy
arrays on the host or jax arrays on a device) into fused ones with rows [q; k; v] and [gate; up],
the layout Phi-3 checkpoints store and the shared layers already run, with each pre-norm's weight
(1 + weight for Gemma) multiplied into the columns of the projection it feeds. Must not: read files
or pick when to fuse (the engine does), or fuse a model split over a mesh: fused rows shard by
position, so a shard would hold another shard's heads (engine.sharding.rules) and every step would
move them.

Why: a decode step of one request multiplies one row by each weight matrix. XLA's GPU emitters
merge the matmuls that share an input from 16 rows up, but at one row launch each on its own and
re-read the input (bench/RESULTS.md, 2026-11-23); one matrix per input is one launch. A norm is
two launches (the row's sum of squares, then the scaled copy the matmul reads); folded, the matmul
reads the residual stream itself and the 1/rms joins the fusion after it (rope, SiLU x up).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from engine.models.config import ModelConfig

# fused module name -> its parts, in row order (the order Phi-3 checkpoints use).
FUSED_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("gate_up_proj", ("gate_proj", "up_proj")),
)


def fused_config(config: ModelConfig) -> ModelConfig:
    """The config whose model runs fused projections (every dense MLP; experts keep their stacks)
    and folded pre-norms."""
    return dataclasses.replace(config, fused_qkv=True, fused_gate_up=True, folded_norms=True)


def is_fused(config: ModelConfig) -> bool:
    return config.fused_qkv and config.fused_gate_up and config.folded_norms


def folded_pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(norm weight, projection weight) HF names of the fused model's folds, per layer: the norm
    before attention into qkv_proj, the norm before a dense MLP into gate_up_proj."""
    mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    pairs = []
    for i in range(config.num_layers):
        block = f"model.layers.{i}"
        pairs.append((f"{block}.input_layernorm.weight", f"{block}.self_attn.qkv_proj.weight"))
        if not config.is_moe_layer(i):
            pairs.append((f"{block}.{mlp_norm}.weight", f"{block}.mlp.gate_up_proj.weight"))
    return pairs


def fold_norms(tensors: dict[str, Any], config: ModelConfig, xp: Any) -> dict[str, Any]:
    """`tensors` (fused names; consumed) with each folded norm's weight multiplied into its
    projection's columns in float32 and dropped. xp: numpy or jax.numpy, the arrays' module.
    A missing projection is skipped, so the caller's check names it; a missing norm is an error,
    since the folded model has no parameter by which a later check could notice it."""
    for norm, proj in folded_pairs(config):
        if proj not in tensors:
            continue
        if norm not in tensors:
            raise ValueError(f"{norm} is missing: {proj} cannot take the norm's weight")
        gamma = xp.asarray(tensors.pop(norm)).astype(xp.float32)  # [D]
        if config.norm_unit_offset:
            gamma = gamma + 1.0
        w = tensors[proj]  # [out, D]
        tensors[proj] = (w.astype(xp.float32) * gamma[None, :]).astype(w.dtype)
    return tensors


def fuse_tensors(
    tensors: dict[str, Any],
    expected: Iterable[str],
    concat: Callable[[Sequence[Any]], Any],
) -> dict[str, Any]:
    """`tensors` (consumed) with the parts of every fused parameter in `expected` replaced by it.

    expected: the fused model's parameter names. A name already present (a checkpoint stored fused)
    is kept; one missing with its parts missing too is left missing, so the caller's check names
    it. concat joins arrays along axis 0 (np.concatenate or jnp.concatenate). Each part leaves the
    dict as its fused tensor is made, so a caller holding no other reference frees one layer's
    parts at a time rather than holding the model twice.
    """
    by_target = dict(FUSED_PARTS)
    for name in expected:
        if name in tensors:
            continue
        module, _, leaf = name.rpartition(".")  # leaf: weight | bias
        block, _, target = module.rpartition(".")
        parts = by_target.get(target)
        if parts is None:
            continue
        sources = [f"{block}.{p}.{leaf}" for p in parts]
        if all(s in tensors for s in sources):
            tensors[name] = concat([tensors.pop(s) for s in sources])  # [sum of outs, in] or [sum of outs]
    return tensors
