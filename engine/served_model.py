"""The model as the engine serves it: on which mesh, and in which weight layout.

Owns: the (data, model) mesh the flags ask for, getting the model onto it (loaded from its
checkpoint, random weights for benchmarks, or a whole model handed in and split over the mesh), and
whether q/k/v and gate/up run fused (engine.models.fuse). Must not: size the KV cache, schedule or
run steps (engine.llm_engine and engine.runner do).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from engine.config import EngineConfig
from engine.models.loader import LoadedModel, load_model, random_model
from engine.runner import Progress
from engine.sharding.load import shard_model
from engine.sharding.mesh import make_mesh


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
