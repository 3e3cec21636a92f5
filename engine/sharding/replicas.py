"""Data-parallel steps: every replica runs its own batch on its own KV cache, in one program.

Owns: turning a one-replica step function into one over stacked per-replica inputs (leading axis =
replica, split over the mesh's "data" axis), and stacking and placing those inputs. Must not:
choose which replica serves a request (the host scheduler balances by load) or hold state.

Why one program rather than one per replica: every host of a multi-host engine runs the same
program on process 0's plan, and one dispatch per step drives all devices. The replica axis is a
shard_map manual over "data" only: each replica runs the unchanged one-replica step on its own
slice (weights are replicated across "data", so replicas never communicate), while "model" stays
automatic, so within a replica the partitioner splits the work exactly as in a single-replica run.
(A vmap with spmd_axis_name would do the same, but jax cannot batch ragged_dot's group sizes,
which the MoE layer needs.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from engine.sharding import rules
from engine.sharding.mesh import DATA, data_parallel
from engine.sharding.placement import place


def over_replicas(step_fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """step_fn(weights, *inputs) for one replica -> fn(weights, *stacked_inputs) for all of them.

    Every leaf of the inputs and outputs gains a leading replica axis; weights are shared.
    Call it inside jit (the caller owns compilation and donation).
    """

    def local(weights: Any, *inputs: Any) -> Any:  # this replica's slice: leading axis of 1
        out = step_fn(weights, *jax.tree.map(lambda x: x[0], inputs))
        return jax.tree.map(lambda x: x[None], out)

    whole, split = rules.partition_spec(mesh, ()), rules.partition_spec(mesh, ("replica",))

    def stepped(weights: Any, *inputs: Any) -> Any:
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(whole, *(split for _ in inputs)),
            out_specs=split,
            axis_names={DATA},  # manual over replicas only; "model" stays with the partitioner
            # The model's loops carry values that vary by replica from constant initial values;
            # replicas never communicate, so there is nothing for the varying-axis check to catch.
            check_vma=False,
        )(weights, *inputs)

    return stepped


def stack(per_replica: Sequence[Any]) -> Any:
    """Host pytrees (one per replica, same shapes) -> one pytree with a leading replica axis."""
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_replica)


def put_stacked(tree: Any, mesh: Mesh) -> Any:
    """Places a stacked pytree: replica axis over "data", everything else whole on each replica."""
    if any(np.shape(x)[0] != data_parallel(mesh) for x in jax.tree.leaves(tree)):
        raise ValueError(f"every leaf needs a leading axis of {data_parallel(mesh)} replicas")
    split = rules.sharding(mesh, ("replica",))
    return jax.tree.map(lambda x: place(x, split), tree)


def unstack(tree: Any) -> list[Any]:
    """Device or host pytree with a leading replica axis -> one host pytree per replica."""
    leaves, treedef = jax.tree.flatten(tree)
    host = [np.asarray(x) for x in leaves]
    return [jax.tree.unflatten(treedef, [x[i] for x in host]) for i in range(host[0].shape[0])]
