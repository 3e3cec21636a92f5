"""Checkpoint layouts: how a family's on-disk tensor names map onto its parameter names.

Owns: the declarative per-family tables (renames, and per-expert tensors stacked into one [E, ...]
parameter), planning a checkpoint's tensors against them from names and shapes alone, and
assembling each planned parameter from the tensors read. Must not: read files, know the model tree
or validate against it (the loader checks the plan's names and shapes against the parameters, so
its messages stay the same for every family).

Why: real MoE checkpoints (Hub and transformers 5's save_pretrained alike) hold one 2D tensor per
expert (Mixtral `block_sparse_moe.experts.{i}.w1/w2/w3.weight`, Qwen-MoE
`mlp.experts.{i}.gate_proj/up_proj/down_proj.weight`), while our grouped matmuls want transformers
5's in-memory layout: `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows) and
`mlp.experts.down_proj` [E, D, F]. A checkpoint already in that stacked layout passes through.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<index>\d+)\.(?P<part>[^.]+)\.weight$")


@dataclasses.dataclass(frozen=True)
class StackExperts:
    """`{block}.experts.{i}.{part}.weight` [out, in] for i < E -> `{block}.experts.{target}`
    [E, sum of outs, in]: the parts, in order, concatenated along the output dim."""

    parts: tuple[str, ...]
    target: str


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    renames: tuple[tuple[str, str], ...] = ()  # (old, new) substrings, applied first, in order
    stacks: tuple[StackExperts, ...] = ()


@dataclasses.dataclass(frozen=True)
class Planned:
    """One parameter: its shape, and the checkpoint tensors it is built from, in assembly order."""

    shape: tuple[int, ...]
    sources: tuple[str, ...]
    num_parts: int = 0  # 0: a single tensor taken as is; else per-part groups of E expert tensors

    def assemble(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        if not self.num_parts:
            return arrays[0]
        out = np.empty(self.shape, arrays[0].dtype)  # [E, sum of outs, in], filled in place
        num_experts, row = self.shape[0], 0
        for p in range(self.num_parts):
            part = arrays[p * num_experts:(p + 1) * num_experts]
            rows = part[0].shape[0]
            for e, a in enumerate(part):
                out[e, row:row + rows] = a
            row += rows
        return out


IDENTITY = CheckpointLayout()
_QWEN_MOE = CheckpointLayout(stacks=(
    StackExperts(("gate_proj", "up_proj"), "gate_up_proj"),
    StackExperts(("down_proj",), "down_proj"),
))
LAYOUTS: Mapping[str, CheckpointLayout] = types.MappingProxyType({
    "MixtralForCausalLM": CheckpointLayout(
        renames=((".block_sparse_moe.", ".mlp."),),
        stacks=(StackExperts(("w1", "w3"), "gate_up_proj"), StackExperts(("w2",), "down_proj")),
    ),
    "Qwen2MoeForCausalLM": _QWEN_MOE,
    "Qwen3MoeForCausalLM": _QWEN_MOE,
})


def layout_for(architecture: str) -> CheckpointLayout:
    return LAYOUTS.get(architecture, IDENTITY)


def _rename(layout: CheckpointLayout, name: str) -> str:
    for old, new in layout.renames:
        name = name.replace(old, new)
    return name


def plan(layout: CheckpointLayout, shapes: Mapping[str, Sequence[int]]) -> dict[str, Planned]:
    """{parameter name: Planned} for checkpoint tensors {name: shape}; raises ValueError, naming
    the tensors, for a gap in the expert indices, experts of different shapes, or two tensors that
    would become the same parameter."""
    part_of = {part: stack for stack in layout.stacks for part in stack.parts}
    out: dict[str, Planned] = {}
    # (block, target) -> part -> {expert index: (name, shape)}
    groups: dict[tuple[str, StackExperts], dict[str, dict[int, tuple[str, tuple[int, ...]]]]] = {}
    for name, shape in shapes.items():
        renamed = _rename(layout, name)
        m = _EXPERT.match(renamed)
        if m and m["part"] in part_of:
            stack = part_of[m["part"]]
            parts = groups.setdefault((m["block"], stack), {})
            parts.setdefault(m["part"], {})[int(m["index"])] = (name, tuple(shape))
        else:
            _add(out, renamed, Planned(tuple(shape), (name,)))
    for (block, stack), parts in sorted(groups.items(), key=lambda kv: kv[0][0]):
        _add(out, f"{block}.experts.{stack.target}", _stacked(block, stack, parts))
    return out


def _add(out: dict[str, Planned], target: str, planned: Planned) -> None:
    if target in out:
        both = sorted(set(out[target].sources[:1] + planned.sources[:1]))
        raise ValueError(f"tensors {both[0]} and {both[-1]} both map to parameter {target}")
    out[target] = planned


def _stacked(block: str, stack: StackExperts, parts: Mapping[str, Mapping[int, tuple]]) -> Planned:
    pattern = f"{block}.experts.*.{{{','.join(stack.parts)}}}.weight"
    num_experts = 1 + max(i for experts in parts.values() for i in experts)
    sources: list[str] = []
    rows, in_dims = 0, set()
    for part in stack.parts:
        experts = parts.get(part, {})
        missing = [i for i in range(num_experts) if i not in experts]
        if missing:
            raise ValueError(
                f"{pattern}: {num_experts} experts, but no {part} tensor for expert(s) "
                + ", ".join(str(i) for i in missing[:8])
            )
        part_shapes = sorted({experts[i][1] for i in range(num_experts)})
        if len(part_shapes) != 1 or len(part_shapes[0]) != 2:
            raise ValueError(f"{pattern}: the {part} tensors are not all 2D of one shape ({part_shapes})")
        rows += part_shapes[0][0]
        in_dims.add(part_shapes[0][1])
        sources.extend(experts[i][0] for i in range(num_experts))
    if len(in_dims) != 1:
        raise ValueError(f"{pattern}: parts {', '.join(stack.parts)} differ in input size")
    return Planned((num_experts, rows, in_dims.pop()), tuple(sources), num_parts=len(stack.parts))


def describe(planned: Planned, where: Callable[[str], str]) -> str:
    """Where a planned parameter comes from, for error messages: its file, and for a stacked one
    the per-expert tensors it is built from."""
    if not planned.num_parts:
        return where(planned.sources[0])
    first, last = planned.sources[0], planned.sources[-1]
    return f"{where(first)} (stacked from {planned.num_parts} x {planned.shape[0]} tensors {first} .. {last})"


def assemble_all(
    planned: Mapping[str, Planned],
    read: Callable[[Iterable[str], Mapping[str, np.dtype]], Mapping[str, np.ndarray]],
    dtypes: Mapping[str, np.dtype],
) -> dict[str, np.ndarray]:
    """Reads and assembles every planned parameter. `read(names, dtypes)` returns checkpoint
    tensors by name, each cast to its dtype; single tensors are read in one call, stacked ones one
    parameter at a time so the host never holds a layer's expert copies twice over."""
    single = {p.sources[0]: name for name, p in planned.items() if not p.num_parts}
    arrays = read(list(single), {src: dtypes[name] for src, name in single.items()})
    out = {single[src]: a for src, a in arrays.items()}
    for name, p in planned.items():
        if p.num_parts:
            parts = read(p.sources, {src: dtypes[name] for src in p.sources})
            out[name] = p.assemble([parts[src] for src in p.sources])
    return out


def convert(layout: CheckpointLayout, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An in-memory checkpoint {name: array} in the family's parameter names and layout."""
    planned = plan(layout, {n: np.shape(t) for n, t in tensors.items()})
    return {name: p.assemble([np.asarray(tensors[s]) for s in p.sources]) for name, p in planned.items()}
