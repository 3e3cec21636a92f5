"""Tilings of the one-row GEMV kernel, tuned per device kind and weight shape.

Owns: `GemvBlocks`, the table of measured choices and the rule for shapes not in it. Must not:
measure anything (the figures come from `bench/gemv_bench.py --fused`, recorded in
bench/RESULTS.md) or import jax.

Rules the kernel relies on: block_n and block_k are powers of two; block_k divides K and block_n
divides the output rows (of a paired weight: the pairing's offset, see Pairing). Shapes not in the
table take the largest block_k up to 512 that divides K and block_n 16, 8 or 4, or no tiling at all
(the caller then runs XLA's dot).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Pairing:
    """Each program also owns the rows `offset` after its own, in periods of `period` rows: a gated
    weight's up rows (period N, offset N/2), or rope's rotation partners (period H, offset H/2)."""

    period: int
    offset: int


@dataclasses.dataclass(frozen=True)
class GemvBlocks:
    block_n: int  # output rows per program (gated: gate rows, and as many up rows)
    block_k: int  # columns per inner-loop step
    num_warps: int = 4
    num_stages: int = 3


# H100, bench/gemv_bench.py --fused (2026-11-23, fifth pass): Llama-3.1-8B's projections, the
# tilings of the model A/B in bench/RESULTS.md (alone: within ~1 us of the best of each sweep).
# Key: (device-kind prefix, N, K, "plain" | "gated" | "rope").
TUNED: dict[tuple[str, int, int, str], GemvBlocks] = {
    ("NVIDIA H100", 6144, 4096, "plain"): GemvBlocks(16, 512, 4, 3),  # qkv, partial rotary
    ("NVIDIA H100", 6144, 4096, "rope"): GemvBlocks(8, 512, 8, 3),  # qkv: 22.9 us (XLA + rope: 26.0)
    ("NVIDIA H100", 4096, 4096, "plain"): GemvBlocks(16, 512, 8, 3),  # o: 16.4 (XLA + add: 17.4)
    ("NVIDIA H100", 28672, 4096, "gated"): GemvBlocks(8, 1024, 8, 2),  # gate_up: 83.8-85.8 (86.5)
    ("NVIDIA H100", 4096, 14336, "plain"): GemvBlocks(8, 512, 4, 3),  # down: 45.9-46.0 (46.5)
}


def fits(n: int, k: int, blocks: GemvBlocks, pairing: Pairing | None = None) -> bool:
    """Whether an [n, k] weight tiles evenly under `blocks` (and `pairing`)."""
    if k % blocks.block_k:
        return False
    if pairing is None:
        return n % blocks.block_n == 0
    # Each period splits into two equal halves (an odd gated weight or head dim has no partner rows).
    halves = pairing.period == 2 * pairing.offset
    return halves and n % pairing.period == 0 and pairing.offset % blocks.block_n == 0


def pairing_of(n: int, *, gated: bool = False, rope_dim: int | None = None) -> Pairing | None:
    """How a program pairs its rows: gate with up, or each half-head with its rotation partner."""
    if gated:
        return Pairing(period=n, offset=n // 2)
    if rope_dim is not None:
        return Pairing(period=rope_dim, offset=rope_dim // 2)
    return None


def blocks_for(n: int, k: int, *, gated: bool = False, rope_dim: int | None = None,
               device_kind: str = "") -> GemvBlocks | None:
    """The tiling for an [n, k] weight, gated ([gate; up] rows) or with rope over heads of
    rope_dim rows, or None where none tiles it."""
    pairing = pairing_of(n, gated=gated, rope_dim=rope_dim)
    kind = "gated" if gated else "rope" if rope_dim is not None else "plain"
    for (dev, tn, tk, tkind), blocks in TUNED.items():
        if device_kind.startswith(dev) and (tn, tk, tkind) == (n, k, kind):
            return blocks
    block_k = next((b for b in (512, 256, 128, 64, 32, 16) if k % b == 0), None)
    if block_k is None:
        return None
    for block_n in (16, 8, 4):
        blocks = GemvBlocks(block_n, block_k, num_warps=4 if block_k <= 256 else 8, num_stages=3)
        if fits(n, k, blocks, pairing):
            return blocks
    return None
