"""StepLayout: where the runner's per-step arrays live, on one device or on a (data, model) mesh.

Owns: the shardings of the runner's step inputs, KV caches and outputs; placing each step's host
arrays (one replica's, or every replica's stacked on a leading axis); the abstract shapes programs
are compiled for; turning a one-replica step function into the program the mesh runs (data-parallel
replicas through engine.sharding.replicas, attention split over kv heads by shard_map); and outputs
every host can read. Must not: choose parameter layouts (engine.sharding.rules does), build step
inputs (the runner does) or know what a Schedule is.

One device (mesh None) keeps the fast path as it was: host arrays go to jit as numpy, nothing is
wrapped. With a mesh, every step input is replicated over "model" (each shard reads all of it) and,
with several replicas, split over "data"; sampled tokens and logprobs come back replicated so
every host of a multi-host engine can read them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from engine.sharding import rules
from engine.sharding.mesh import data_parallel
from engine.sharding.placement import place, zeros
from engine.sharding.replicas import over_replicas, stack, unstack


class StepLayout:
    def __init__(self, mesh: Mesh | None) -> None:
        self.mesh = mesh
        self.num_replicas = data_parallel(mesh) if mesh is not None else 1
        self.stacked = self.num_replicas > 1  # inputs and outputs carry a leading replica axis
        self.multi_process = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
        if mesh is not None:
            axes = rules.per_replica(()) if self.stacked else ()
            self._inputs = rules.sharding(mesh, axes)
            self._replicated = rules.sharding(mesh, ())

    # ---- placement -----------------------------------------------------------------------------

    def kv_cache(self, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        """One layer's zeroed cache: [2, P, S, K, H], or [replicas, 2, P, S, K, H]."""
        if self.mesh is None:
            return jax.numpy.zeros(shape, dtype)
        full = (self.num_replicas, *shape) if self.stacked else shape
        return zeros(full, dtype, rules.kv_cache_sharding(self.mesh, stacked=self.stacked))

    def stack(self, per_replica: Sequence[Any]) -> Any:
        """Host pytrees, one per replica -> what the programs take (stacked only with replicas)."""
        return stack(per_replica) if self.stacked else per_replica[0]

    def unstack(self, tree: Any) -> list[Any]:
        return unstack(tree) if self.stacked else [tree]

    def put(self, tree: Any, *, readable: bool = False) -> Any:
        """A step's host arrays onto the devices with the input sharding (readable: the sharding
        of readable program outputs, whole on every device)."""
        if self.mesh is None:
            return tree if not readable else jax.device_put(tree)  # jit copies numpy to the one device
        sharding = self._replicated if readable else self._inputs
        if self.multi_process:  # each process copies its own shards; see placement.place
            return jax.tree.map(lambda x: place(x, sharding), tree)
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(treedef, jax.device_put(leaves, [sharding] * len(leaves)))

    def abstract(self, shape: tuple[int, ...], dtype: Any, *, readable: bool = False) -> jax.ShapeDtypeStruct:
        """The compile-time stand-in of one replica's input of `shape` (readable: of an output of a
        readable program fed back in, as the sampled tokens are)."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        full = (self.num_replicas, *shape) if self.stacked else shape
        return jax.ShapeDtypeStruct(full, dtype, sharding=self._replicated if readable else self._inputs)

    def abstract_like(self, tree: Any) -> Any:
        """Compile-time stand-ins for a host pytree of one replica's arrays."""
        return jax.tree.map(lambda x: self.abstract(np.shape(x), np.asarray(x).dtype), tree)

    # ---- programs ------------------------------------------------------------------------------

    def program(self, step_fn: Callable[..., Any], *, readable: bool = False) -> Callable[..., Any]:
        """step_fn(weights, *one_replica_inputs) as the function to jit for this layout.

        readable: its outputs are gathered whole onto every device, so any host can read them.
        """
        if self.mesh is None:
            return step_fn
        fn = over_replicas(step_fn, self.mesh) if self.stacked else step_fn
        if not readable:
            return fn
        replicated = self._replicated

        def gathered(*args: Any) -> Any:
            out = fn(*args)
            return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), out)

        return gathered

    def tracing(self) -> contextlib.AbstractContextManager:
        """Context for lowering programs: shard_map inside the model reads the mesh from it."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
