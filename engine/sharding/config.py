"""ShardingConfig: how many devices split each model (tensor parallel), how many replicas, which hosts.

Owns: the frozen, validated scale-out settings (TGI launcher names: --num-shard, plus
--data-parallel-size and the multi-host flags) and resolving the "auto" tensor-parallel degree
against a device count. Must not: import jax (EngineConfig and the CLI hold it before any backend
starts, and jax.distributed must be initialized before jax touches a device).
"""

from __future__ import annotations

import dataclasses

# Exit status of an engine process stopped because a peer host died or hung: a launcher or
# orchestrator can tell it apart from a crash of this host.
EXIT_PEER_FAILURE = 75


class LayoutError(ValueError):
    """A mesh or model layout that cannot work; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    # Devices that split one model copy (TGI --num-shard). None: every device not used for more
    # replicas, as TGI does with every visible GPU.
    tensor_parallel: int | None = None
    data_parallel: int = 1  # model copies, each serving its own batch
    # Multi-host (jax.distributed). All None on one host; on Cloud TPU VMs, Slurm and Open MPI
    # jax detects them when they are left unset.
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # A host that stops sending heartbeats for this long is declared dead and every process
    # stops. jax's own default (100 s) is too slow for a server behind a health check.
    heartbeat_timeout_s: int = 10
    initialization_timeout_s: int = 300  # how long processes wait for each other at start-up
    # Longest a step (or a follower's wait for the next step plan) may take before the engine
    # declares a host hung and stops. Idle leaders send keep-alive plans well within it.
    step_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.tensor_parallel is not None and self.tensor_parallel < 1:
            raise LayoutError(f"--num-shard must be >= 1, got {self.tensor_parallel}")
        if self.data_parallel < 1:
            raise LayoutError(f"--data-parallel-size must be >= 1, got {self.data_parallel}")
        if self.num_processes is not None and self.num_processes < 1:
            raise LayoutError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None:
            if self.process_id < 0:
                raise LayoutError(f"--process-id must be >= 0, got {self.process_id}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise LayoutError(
                    f"--process-id {self.process_id} is out of range for --num-processes {self.num_processes}"
                )
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise LayoutError(
                f"--coordinator-address must be host:port, got {self.coordinator_address!r}"
            )
        for name in ("heartbeat_timeout_s", "initialization_timeout_s", "step_timeout_s"):
            if getattr(self, name) <= 0:
                raise LayoutError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def is_multi_host_requested(self) -> bool:
        """Whether the user named any multi-host setting (else jax may still auto-detect a cluster)."""
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))

    def degrees(self, num_devices: int) -> tuple[int, int]:
        """(data_parallel, tensor_parallel) for `num_devices` devices, or LayoutError."""
        dp = self.data_parallel
        tp = self.tensor_parallel
        if tp is None:
            if num_devices % dp:
                raise LayoutError(
                    f"--data-parallel-size {dp} does not divide the {num_devices} visible devices; "
                    "set --num-shard too"
                )
            tp = num_devices // dp
        if dp * tp > num_devices:
            raise LayoutError(
                f"--num-shard {tp} x --data-parallel-size {dp} needs {dp * tp} devices, "
                f"but only {num_devices} are visible"
            )
        return dp, tp
