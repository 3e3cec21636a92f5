"""The device mesh: ("data", "model") = (replicas, shards of one model copy).

Owns: choosing which devices form each replica (a replica's devices stay on one host whenever
the counts allow, so tensor-parallel collectives never cross hosts needlessly), the clear error for
a layout the visible devices cannot hold, and a printable description of the mesh. Must not: know
models or parameter names (engine.sharding.rules maps those onto these two axes).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from engine.sharding.config import LayoutError, ShardingConfig

DATA, MODEL = "data", "model"  # the only mesh axis names; rules.py maps logical axes onto them
AXES = (DATA, MODEL)


def make_mesh(cfg: ShardingConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data_parallel, tensor_parallel) mesh over `devices` (default: every global device).

    One process may use fewer devices than it sees (the first dp x tp, as TGI's --num-shard
    does); several processes must use all of them, since every host runs the same program.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise LayoutError("no devices are visible")
    dp, tp = cfg.degrees(len(devices))
    processes = {d.process_index for d in devices}
    if dp * tp < len(devices) and len(processes) > 1:
        raise LayoutError(
            f"--num-shard {tp} x --data-parallel-size {dp} uses {dp * tp} of the {len(devices)} devices of "
            f"{len(processes)} hosts; a multi-host engine must use every device"
        )
    # Host-major order: consecutive devices share a host, so a replica of tp devices spans whole
    # hosts (tp >= devices per host) or sits inside one (tp dividing it).
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))[: dp * tp]
    if ordered[0].platform == "tpu" and len(processes) == 1:
        from jax.experimental import mesh_utils

        # TPU chips form a torus: let jax pick an order whose neighbours are ICI neighbours.
        grid = mesh_utils.create_device_mesh((dp, tp), devices=ordered, allow_split_physical_axes=True)
    else:
        grid = np.array(ordered, dtype=object).reshape(dp, tp)
    # Auto axes: sharding propagates from the parameters and the cache through every op (GSPMD), so
    # the model code carries no partitioning of its own.
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def tensor_parallel(mesh: Mesh) -> int:
    return int(mesh.shape[MODEL])


def data_parallel(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def replica_hosts(mesh: Mesh) -> list[list[int]]:
    """The process indices each replica's devices live on, replica by replica."""
    return [sorted({d.process_index for d in row}) for row in mesh.devices]


def split_replicas(mesh: Mesh) -> list[int]:
    """Replicas whose devices straddle a host boundary without owning whole hosts (slower collectives)."""
    per_host = collections.Counter(d.process_index for d in mesh.devices.flat)
    bad = []
    for i, hosts in enumerate(replica_hosts(mesh)):
        if len(hosts) > 1 and any(
            sum(1 for d in mesh.devices[i] if d.process_index == h) != per_host[h] for h in hosts
        ):
            bad.append(i)
    return bad


def describe_mesh(mesh: Mesh) -> str:
    """Multi-line summary: axes, platform, and each replica's devices and hosts."""
    flat = list(mesh.devices.flat)
    num_hosts = len({d.process_index for d in flat})
    hosts_word = "hosts" if num_hosts > 1 else "host"
    lines = [(f"mesh: data={data_parallel(mesh)} x model={tensor_parallel(mesh)} over {len(flat)} "
              f"{flat[0].platform} devices on {num_hosts} {hosts_word}")]
    for i, (row, hosts) in enumerate(zip(mesh.devices, replica_hosts(mesh), strict=True)):
        ids = ",".join(str(d.id) for d in row)
        lines.append(f"  replica {i}: devices {ids} (host{'s' if len(hosts) > 1 else ''} "
                     f"{','.join(map(str, hosts))})")
    for i in split_replicas(mesh):
        lines.append(f"  warning: replica {i} shares hosts with another replica; its collectives cross hosts")
    return "\n".join(lines)
