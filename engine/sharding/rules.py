"""The one logical-axis table: every parameter, cache and activation layout of every model family.

Owns: (1) which logical axes each parameter's dimensions carry, by Hugging Face state_dict name
(NNX param paths are HF names), (2) which mesh axis each logical axis is split over, (3) the KV
cache and activation layouts, and the NamedShardings built from them. Must not: appear as
PartitionSpec literals anywhere else, or let a parameter it does not know run silently replicated:
an unknown name fails at start-up, so a new family must add its rows here.

Megatron-style tensor parallelism over the "model" mesh axis: q/k/v and gate/up projections split
their output rows (heads, FFN columns), o/down projections their input columns, so each block needs
one all-reduce; embedding and LM head split the vocabulary (logits stay vocab-sharded into the
sampler). The KV cache splits over kv heads (engine.sharding.kv_heads makes sure there are enough).
Fused projections (Phi-3 qkv_proj / gate_up_proj, stacked expert gate_up_proj) split their rows
evenly too, so a shard may hold, say, all of gate and none of up: the model slices q/k/v (gate/up)
out of the fused output by position, and the partitioner moves those slices between shards with
collective permutes the size of one shard's activations. Correct by construction (sharding never
changes the math) and measured cheaper than the alternatives on CPU, tp 4, 2-layer models (T=48):
row-parallel on the input dim cost Qwen2-MoE 11 all-reduces + 5 all-gathers and Phi-3 14
all-reduces per step, against 4 and 5 all-reduces (plus 4 and 24 small permutes) for the row split.
Reordering rows at load cannot work: the model slices by position. Experts split inside each
expert (its FFN columns), not across experts: every shard runs every expert on its slice.
Data parallelism: replicas are the "data" axis; weights are replicated across it, each replica's
batch and KV cache are split over it (see engine.sharding.replicas).
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine.sharding.config import LayoutError
from engine.sharding.mesh import DATA, MODEL

Axes = tuple[str | None, ...]

# HF name pattern -> logical axes of the tensor's dimensions (HF layout: Linear weights [out, in]).
# First match wins; patterns are anchored on the trailing module path so every family's prefix fits.
_PARAM_TABLE: tuple[tuple[str, Axes], ...] = (
    (r"(^|\.)embed_tokens\.weight$", ("vocab", "embed")),  # [V, D]
    (r"^lm_head\.weight$", ("vocab", "embed")),  # [V, D]
    # attention
    (r"\.q_proj\.weight$", ("q_heads", "embed")),  # [N*H, D]
    (r"\.q_proj\.bias$", ("q_heads",)),
    (r"\.[kv]_proj\.weight$", ("kv_heads", "embed")),  # [K*H, D]
    (r"\.[kv]_proj\.bias$", ("kv_heads",)),
    (r"\.o_proj\.weight$", ("embed", "q_heads")),  # [D, N*H]
    (r"\.o_proj\.bias$", ("embed",)),  # added once, after the all-reduce
    (r"\.qkv_proj\.weight$", ("fused_heads", "embed")),  # [(N+2K)*H, D], rows [q; k; v]
    (r"\.qkv_proj\.bias$", ("fused_heads",)),
    (r"\.[qk]_norm\.weight$", ("head_dim",)),  # [H], shared by every head
    # MoE: router, stacked experts [E, ...] (split inside each expert), shared expert and its gate
    (r"\.gate\.weight$", ("experts", "embed")),  # router [E, D]
    (r"\.gate\.e_score_correction_bias$", ("experts",)),
    (r"\.experts\.gate_up_proj(\.weight)?$", ("experts", "fused_ffn", "embed")),  # [E, 2F, D]
    (r"\.experts\.(gate_proj|up_proj|w1|w3)(\.weight)?$", ("experts", "ffn", "embed")),  # [E, F, D]
    (r"\.experts\.(down_proj|w2)(\.weight)?$", ("experts", "embed", "ffn")),  # [E, D, F]
    (r"\.shared_expert_gate\.weight$", (None, "embed")),  # [1, D]
    # dense MLP (also the shared expert's)
    (r"\.(gate_proj|up_proj)\.weight$", ("ffn", "embed")),  # [F, D]
    (r"\.(gate_proj|up_proj)\.bias$", ("ffn",)),
    (r"\.gate_up_proj\.weight$", ("fused_ffn", "embed")),  # [2F, D], rows [gate; up]
    (r"\.down_proj\.weight$", ("embed", "ffn")),  # [D, F]
    (r"\.down_proj\.bias$", ("embed",)),
    # every RMSNorm/LayerNorm (input, post-attention, Gemma's pre/post-feedforward, final)
    (r"norm\.(weight|bias)$", ("embed",)),
)
PARAM_RULES: tuple[tuple[re.Pattern[str], Axes], ...] = tuple((re.compile(p), a) for p, a in _PARAM_TABLE)

# Logical axis -> mesh axis (None: replicated). Anything not listed is replicated.
LOGICAL_TO_MESH: Mapping[str, str | None] = types.MappingProxyType({
    "vocab": MODEL,
    "q_heads": MODEL,
    "kv_heads": MODEL,
    "ffn": MODEL,
    "fused_heads": MODEL,
    "fused_ffn": MODEL,
    "replica": DATA,
    "embed": None,
    "head_dim": None,
    "experts": None,
})
# Splitting these is an optimization, not a requirement: when the mesh axis does not divide the
# dimension (a vocabulary of 32001), the tensor is replicated on that axis and the report says so.
# Every other split axis must divide evenly, or start-up stops.
_OPTIONAL = frozenset({"vocab"})

# Non-parameter layouts. Shape legend: T tokens, R rows (requests), D model dim, V vocab,
# P pages, S slots per page, K kv heads, H head dim.
KV_CACHE: Axes = ("kv", "pages", "slots", "kv_heads", "head_dim")  # [2, P, S, K, H]
TOKENS: Axes = ("tokens",)  # [T] ids, positions, slot mapping
HIDDEN: Axes = ("tokens", "embed")  # [T, D]
LOGITS: Axes = ("rows", "vocab")  # [R, V]
ROWS: Axes = ("rows",)  # [R] per-request scalars
ATTN_Q: Axes = ("tokens", "q_heads", "head_dim")  # [T, N, H] queries and attention output
ATTN_KV: Axes = ("tokens", "kv_heads", "head_dim")  # [T, K, H] new keys and values


def per_replica(axes: Axes) -> Axes:
    """The same layout with a leading replica axis: one slice per data-parallel replica."""
    return ("replica", *axes)


class UnknownParamError(LayoutError):
    pass


def param_axes(name: str, ndim: int) -> Axes:
    """Logical axes of the parameter `name` with `ndim` dimensions, or UnknownParamError."""
    for pattern, axes in PARAM_RULES:
        if pattern.search(name):
            if len(axes) != ndim:
                raise UnknownParamError(
                    f"parameter {name} has {ndim} dimensions but its sharding rule {pattern.pattern!r} "
                    f"names {len(axes)}; add a rule for it in engine/sharding/rules.py"
                )
            return axes
    raise UnknownParamError(
        f"no sharding rule for parameter {name}: add one to engine/sharding/rules.py "
        "(an unknown parameter would otherwise run replicated on every shard)"
    )


def _mesh_axes(mesh: Mesh, axes: Axes, shape: Sequence[int] | None) -> tuple[list[str | None], list[str]]:
    """Mesh axis per dimension, and the optional splits dropped because they do not divide evenly."""
    out, dropped = [], []
    for i, axis in enumerate(axes):
        mesh_axis = LOGICAL_TO_MESH.get(axis) if axis is not None else None
        if mesh_axis is not None and shape is not None and shape[i] % mesh.shape[mesh_axis]:
            if axis not in _OPTIONAL:
                raise LayoutError(
                    f"dimension {i} ({axis}) of size {shape[i]} cannot be split evenly over "
                    f"{mesh.shape[mesh_axis]} devices (mesh axis {mesh_axis!r})"
                )
            dropped.append(axis)
            mesh_axis = None
        out.append(mesh_axis)
    return out, dropped


def partition_spec(mesh: Mesh, axes: Axes, shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec of `axes` on `mesh`; with `shape`, checks each split divides evenly."""
    spec, _ = _mesh_axes(mesh, axes, shape)
    while spec and spec[-1] is None:  # canonical form: P('model') rather than P('model', None)
        spec.pop()
    return PartitionSpec(*spec)


def sharding(mesh: Mesh, axes: Axes, shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(mesh, axes, shape))


def param_sharding(mesh: Mesh, name: str, shape: Sequence[int]) -> NamedSharding:
    """The NamedSharding of one parameter; LayoutError names it when it cannot be split."""
    axes = param_axes(name, len(shape))
    try:
        return sharding(mesh, axes, shape)
    except LayoutError as e:
        raise LayoutError(f"parameter {name} {tuple(shape)}: {e}") from e


def param_shardings(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> dict[str, NamedSharding]:
    """{HF name: NamedSharding} for every parameter; all unknown names are listed in one error."""
    unknown = [n for n in shapes if not any(p.search(n) for p, _ in PARAM_RULES)]
    if unknown:
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise UnknownParamError(
            "no sharding rule in engine/sharding/rules.py for: " + ", ".join(unknown[:20]) + more
            + " (an unknown parameter would otherwise run replicated on every shard)"
        )
    return {name: param_sharding(mesh, name, shape) for name, shape in shapes.items()}


def unsplit_params(shapes: Mapping[str, Sequence[int]], mesh: Mesh) -> list[str]:
    """Parameters kept whole on an axis their rule splits, because it does not divide evenly."""
    return [n for n, shape in shapes.items() if _mesh_axes(mesh, param_axes(n, len(shape)), shape)[1]]


def kv_cache_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Layer cache [2, P, S, K, H] split over kv heads; stacked: [replicas, 2, P, S, K, H]."""
    return sharding(mesh, per_replica(KV_CACHE) if stacked else KV_CACHE)


def logits_sharding(mesh: Mesh, vocab_size: int, *, stacked: bool = False) -> NamedSharding:
    """Logits [R, V] split over the vocabulary (replicated when it does not divide evenly)."""
    axes = per_replica(LOGITS) if stacked else LOGITS
    shape = (mesh.shape[DATA], 1, vocab_size) if stacked else (1, vocab_size)
    return sharding(mesh, axes, shape)
