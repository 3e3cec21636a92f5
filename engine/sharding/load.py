"""Putting a model on a mesh, and the start-up layout report and memory check.

Owns: the sharded loading sequence (plan kv heads for the shard count, replicate them in the
checkpoint tensors, build the abstract model whose params carry the rule shardings, let
engine.models.params.assign_params place every tensor straight onto its shards), the bytes each
device holds, and the refusal of a layout that cannot fit. Must not: read checkpoints (the loader
does and hands over its tensors) or decide a parameter's layout (engine.sharding.rules does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from engine.models.base import AttentionFn
from engine.models.config import ModelConfig
from engine.models.params import assign_params, named_params
from engine.models.registry import build_abstract_model
from engine.sharding import rules
from engine.sharding.config import LayoutError
from engine.sharding.kv_heads import KVHeadPlan, plan_kv_heads, replicate_kv_heads, sharded_config
from engine.sharding.mesh import describe_mesh, tensor_parallel
from engine.sharding.placement import place


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    model: Any  # the CausalLM; every param a global array laid out by engine.sharding.rules
    config: ModelConfig  # as run: num_kv_heads may exceed the checkpoint's (see kv_heads)
    mesh: Mesh
    kv_plan: KVHeadPlan


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.get_value().shape) for name, p in named_params(model).items()}


def abstract_sharded_model(
    config: ModelConfig, *, dtype: Any, mesh: Mesh, attention_fn: AttentionFn | None = None
) -> ShardedModel:
    """The model as it will run on `mesh`, nothing allocated: params are ShapeDtypeStructs carrying
    their NamedShardings, so the layout report and memory check can run before any weight is read.

    LayoutError for a shard count the heads cannot take or a dimension that cannot split.
    """
    plan = plan_kv_heads(config, tensor_parallel(mesh))
    run_config = sharded_config(config, plan)
    model = build_abstract_model(run_config, dtype=jnp.dtype(dtype), attention_fn=attention_fn)
    shardings = rules.param_shardings(_shapes(model), mesh)
    for name, param in named_params(model).items():
        value = param.get_value()
        param.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[name]))
    return ShardedModel(model=model, config=run_config, mesh=mesh, kv_plan=plan)


def fill_sharded(sharded: ShardedModel, tensors: Mapping[str, Any], *, dtype: Any) -> ShardedModel:
    """Places the checkpoint `tensors` (HF names and layout, the checkpoint's kv heads) onto the
    abstract sharded model; ValueError (from assign_params) when they do not fit its config.

    Every process of a multi-host mesh passes the same tensors; each keeps its own devices' shards.
    """
    c = sharded.config
    tensors = replicate_kv_heads(tensors, sharded.kv_plan, num_heads=c.num_heads, head_dim=c.head_dim)
    dtype = jnp.dtype(dtype)
    placed = dict(tensors)
    for name, param in named_params(sharded.model).items():
        value = param.get_value()
        if name in tensors and tuple(np.shape(tensors[name])) == tuple(value.shape):
            placed[name] = place(tensors[name], value.sharding, dtype)
    # Already on their shards, so assign_params only checks names and shapes and keeps them as is;
    # anything that does not fit is left for it to report.
    assign_params(sharded.model, placed, dtype)
    return sharded


def load_sharded(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    *,
    dtype: Any,
    mesh: Mesh,
    attention_fn: AttentionFn | None = None,
) -> ShardedModel:
    """The model of `config` (as in the checkpoint) with `tensors` placed on `mesh`."""
    sharded = abstract_sharded_model(config, dtype=dtype, mesh=mesh, attention_fn=attention_fn)
    return fill_sharded(sharded, tensors, dtype=dtype)


def shard_model(model: Any, mesh: Mesh, *, attention_fn: AttentionFn | None = None) -> ShardedModel:
    """A concrete (e.g. randomly initialized) model re-laid out on `mesh`, through the same path."""
    params = named_params(model)
    dtype = next(iter(params.values())).get_value().dtype
    tensors = {name: np.asarray(p.get_value()) for name, p in params.items()}
    return load_sharded(model.config, tensors, dtype=dtype, mesh=mesh, attention_fn=attention_fn)


def weight_bytes_per_device(model: Any) -> int:
    """Bytes of parameters on each device (the same on every device: shards are even)."""
    total = 0
    for param in named_params(model).values():
        value = param.get_value()
        sharding = getattr(value, "sharding", None)
        shape = sharding.shard_shape(value.shape) if sharding is not None else value.shape
        total += math.prod(shape) * jnp.dtype(value.dtype).itemsize
    return total


def kv_bytes_per_token(config: ModelConfig, mesh: Mesh, kv_dtype: Any) -> int:
    """K and V bytes one token takes on each device over every layer (a full-attention count)."""
    heads_per_device = config.num_kv_heads // tensor_parallel(mesh)
    return 2 * config.num_layers * heads_per_device * config.head_dim * jnp.dtype(kv_dtype).itemsize


def device_memory_bytes(device: jax.Device) -> tuple[int, bool]:
    """(bytes this device may hold, whether that is the device's own memory).

    Accelerators report their limit; simulated CPU devices share host RAM, counted as an even split.
    """
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), True
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ram // max(jax.local_device_count(), 1), False


@dataclasses.dataclass(frozen=True)
class LayoutReport:
    mesh: str
    num_kv_heads: int
    sharded_kv_heads: int
    weight_bytes_per_device: int
    kv_bytes_per_token: int  # per device
    device_bytes: int
    device_is_accelerator: bool
    memory_fraction: float
    unsplit_params: tuple[str, ...]

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.device_bytes * self.memory_fraction) - self.weight_bytes_per_device

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV one replica can hold (each of its devices holds its heads' share)."""
        return max(self.kv_budget_bytes, 0) // max(self.kv_bytes_per_token, 1)

    def __str__(self) -> str:
        where = "device memory" if self.device_is_accelerator else "host RAM share"
        lines = [self.mesh]
        if self.sharded_kv_heads != self.num_kv_heads:
            lines.append(f"kv heads: {self.num_kv_heads} replicated to {self.sharded_kv_heads} "
                         f"(each shard holds whole copies of the heads it reads)")
        lines += [
            (f"weights: {_size(self.weight_bytes_per_device)} per device of {_size(self.device_bytes)} "
             f"{where} (memory fraction {self.memory_fraction:g})"),
            (f"KV cache: {_size(self.kv_bytes_per_token)} per token per device; "
             f"{self.kv_capacity_tokens} tokens per replica fit in the "
             f"{_size(max(self.kv_budget_bytes, 0))} left per device"),
        ]
        if self.unsplit_params:
            names = self.unsplit_params
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            lines.append(f"not split (size not divisible by the shard count), replicated: "
                         f"{', '.join(names[:5])}{more}")
        return "\n".join(lines)


def layout_report(
    sharded: ShardedModel, *, kv_dtype: Any, memory_fraction: float, device_bytes: int | None = None
) -> LayoutReport:
    """What the start-up log prints; works on abstract models too (the numbers come from shapes)."""
    measured, is_accel = device_memory_bytes(sharded.mesh.devices.flat[0])
    return LayoutReport(
        mesh=describe_mesh(sharded.mesh),
        num_kv_heads=sharded.kv_plan.num_kv_heads,
        sharded_kv_heads=sharded.kv_plan.sharded_kv_heads,
        weight_bytes_per_device=weight_bytes_per_device(sharded.model),
        kv_bytes_per_token=kv_bytes_per_token(sharded.config, sharded.mesh, kv_dtype),
        device_bytes=measured if device_bytes is None else device_bytes,
        device_is_accelerator=is_accel,
        memory_fraction=memory_fraction,
        unsplit_params=tuple(rules.unsplit_params(_shapes(sharded.model), sharded.mesh)),
    )


def check_fits(report: LayoutReport, *, min_kv_tokens: int) -> None:
    """LayoutError when the weights, or the weights plus `min_kv_tokens` of KV, exceed a device."""
    budget = report.device_bytes * report.memory_fraction
    if report.weight_bytes_per_device > budget:
        raise LayoutError(
            f"the weights need {_size(report.weight_bytes_per_device)} per device, more than "
            f"{_size(budget)} ({report.memory_fraction:g} of {_size(report.device_bytes)}): "
            "use more shards (--num-shard) or a smaller --dtype"
        )
    if report.kv_capacity_tokens < min_kv_tokens:
        raise LayoutError(
            f"after the weights, each device has room for {report.kv_capacity_tokens} tokens of KV cache, "
            f"fewer than the {min_kv_tokens} one request may need: use more shards (--num-shard) "
            "or lower --max-total-tokens"
        )
