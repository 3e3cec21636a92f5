"""The model as the engine serves it: on which mesh, and in which weight layout.

Owns: the (data, model) mesh the flags ask for, getting the model onto it (loaded from its
checkpoint, random weights for benchmarks, or a whole model handed in and split over the mesh),
whether q/k/v and gate/up run fused (engine.models.fuse), and the limits the served model's memory
allows (KV cache budget per device, token buckets). Must not: allocate pages, schedule or run steps
(engine.llm_engine and engine.runner do).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
from jax.sharding import Mesh

from engine.config import EngineConfig, KVGroupSpec, Limits, resolve_limits
from engine.models.config import ModelConfig
from engine.models.loader import LoadedModel, load_model, random_model
from engine.runner import Progress
from engine.sharding.load import check_fits, layout_report, shard_model
from engine.sharding.mesh import make_mesh, tensor_parallel

log = logging.getLogger(__name__)


def mesh_for(cfg: EngineConfig) -> Mesh | None:
    """The (data, model) mesh the flags ask for; None for a single device (the unsharded fast path).

    On CPU --num-shard defaults to 1: simulated CPU devices share the host's cores and memory, so
    splitting a model over them only adds collectives. Accelerators default to every device, as TGI.
    """
    sc = cfg.sharding
    devices = jax.devices()
    if sc.tensor_parallel is None and devices[0].platform == "cpu":
        sc = dataclasses.replace(sc, tensor_parallel=1)
    mesh = make_mesh(sc, devices)
    return None if mesh.devices.size == 1 else mesh


def fuse_projections(cfg: EngineConfig, mesh: Mesh | None) -> bool:
    """Whether the model runs q/k/v and gate/up fused. Never on a mesh (engine.models.fuse says
    why); by default on GPUs only, where it was measured: a one-stream decode step on an H100
    (bench/RESULTS.md). TPU pads a row to its tiles and merges matmuls its own way; CPU tests keep
    each family's checkpoint layout."""
    if mesh is not None:
        return False
    return jax.default_backend() == "gpu" if cfg.fuse_projections is None else cfg.fuse_projections


def served_model(
    cfg: EngineConfig,
    mesh: Mesh | None,
    *,
    loaded: LoadedModel | None = None,
    random_weights: bool = False,
    progress: Progress | None = None,
) -> LoadedModel:
    """The model on `mesh`. A `loaded` model is used as it is (its caller chose its layout), split
    over the mesh if it was built whole; random_weights (benchmarks only) makes cfg.model_id's
    config with random weights on the device instead of reading a checkpoint."""
    fuse = fuse_projections(cfg, mesh)
    if loaded is None and random_weights:
        loaded = random_model(cfg.model_id, dtype=cfg.dtype, fuse_projections=fuse)
    if loaded is None:
        # The served length picks static rope variants (Phi-3 longrope short/long factors).
        return load_model(cfg.model_id, revision=cfg.revision, dtype=cfg.dtype, progress=progress,
                          max_model_len=cfg.max_total_tokens, mesh=mesh, memory_fraction=cfg.memory_fraction,
                          fuse_projections=fuse)
    if mesh is not None and loaded.layout is None:  # built whole (random weights, tests)
        layout = shard_model(loaded.model, mesh)
        loaded = dataclasses.replace(loaded, model=layout.model, config=layout.config, layout=layout)
    return loaded


def served_limits(cfg: EngineConfig, loaded: LoadedModel, mesh: Mesh | None) -> Limits:
    """The engine's limits for `loaded` on `mesh`: what the flags ask for, within the KV cache that
    fits beside the weights; raises LayoutError where a sharded model leaves no room for one request."""
    mc = loaded.config
    tp = 1 if mesh is None else tensor_parallel(mesh)
    budget, is_accel = _kv_memory_budget(cfg)
    limits = resolve_limits(
        cfg,
        max_position_embeddings=mc.max_position_embeddings,
        kv_groups=_kv_group_specs(mc, jax.numpy.dtype(loaded.dtype).itemsize, tp),
        free_memory_bytes=budget,
        is_accelerator=is_accel,
        # XLA's GPU emitters read a weight matrix faster for one row than for the 16 of the next
        # bucket (a one-stream decode step on an H100: 6.36 vs 6.68 ms, bench/RESULTS.md). TPU
        # pads rows to its tiles anyway and CPU tests pay per compiled program: GPU only.
        lone_decode_bucket=(jax.default_backend() == "gpu" if cfg.lone_decode_bucket is None
                            else cfg.lone_decode_bucket),
    )
    if loaded.layout is not None:
        report = layout_report(loaded.layout, kv_dtype=loaded.dtype, memory_fraction=cfg.memory_fraction)
        for line in str(report).splitlines():
            log.info("layout: %s", line)
        check_fits(report, min_kv_tokens=limits.max_total_tokens)
    return limits


def _kv_memory_budget(cfg: EngineConfig) -> tuple[int, bool]:
    """Bytes the KV cache may take on device 0 after the weights are loaded, and whether it's an accelerator."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        limit = stats["bytes_limit"]
        # Keep a tenth back for activations, logits and XLA's scratch space.
        budget = int(limit * cfg.memory_fraction) - stats.get("bytes_in_use", 0) - limit // 10
        return max(budget, 0), True
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * cfg.memory_fraction) // 2, False


def _kv_group_specs(mc: ModelConfig, itemsize: int, tensor_parallel: int = 1) -> list[KVGroupSpec]:
    """Per KV cache group of the model: its window and the K/V bytes of one token over its layers,
    on one device (each of `tensor_parallel` shards holds its share of the kv heads)."""
    per_layer = 2 * (mc.num_kv_heads // tensor_parallel) * mc.head_dim * itemsize
    windows = mc.kv_cache_windows()
    layers = [sum(1 for i in range(mc.num_layers) if mc.kv_group_of(i) == g) for g in range(len(windows))]
    return [KVGroupSpec(w, n * per_layer) for w, n in zip(windows, layers)]
