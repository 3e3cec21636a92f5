"""Block sizes of the GPU ragged paged attention kernels, tuned per device, head dim and KV dtype.

Owns: the `BlockSizes` config and the table of measured choices. Must not: measure anything (the
figures come from bench/kernel_bench.py runs, recorded in bench/RESULTS.md) or import jax.

Rules the kernels rely on: every size is a power of two; `rows` >= 16 (Triton's smallest dot);
`block_kv` >= 16. A table key is (device-kind prefix, head dim, KV dtype name); anything not in the
table gets `DEFAULT_GPU` or `DEFAULT_GPU_WIDE` (by K/V row bytes), safe everywhere, tuned for nothing.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class PrefillBlocks:
    rows: int  # query rows per program: tokens x (q heads per kv head, padded to a power of 2)
    block_kv: int  # KV positions per inner-loop step
    num_warps: int
    num_stages: int
    programs: int = 1024  # most programs launched (all kv heads); beyond, each loops over blocks
    prefetch_pages: bool = True  # read page ids a step ahead (deeper K/V pipelining)


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    block_kv: int
    num_splits: int  # most programs one decode token's context is split over (flash-decoding)
    min_split_blocks: int  # a split covers at least this many KV blocks: short contexts stay whole
    num_warps: int
    num_stages: int
    programs: int = 2048  # most programs launched (all kv heads and splits); beyond, each loops
    prefetch_pages: bool = True
    # A bucket whose decode items x kv heads is below `fill` cannot occupy the device with
    # num_splits programs each: a lone decode's few long loops are latency bound (an H100, one
    # stream, context <= 512: 12 us per layer in one split). Such buckets split up to max_splits
    # ways and down to one block per split. 0 keeps the tuned splits everywhere.
    fill: int = 256
    max_splits: int = 16

    def for_items(self, items: int, num_kv_heads: int) -> DecodeBlocks:
        """The sizes of a bucket with room for `items` decode tokens (a static capacity)."""
        busy = items * num_kv_heads
        if busy >= self.fill:
            return self
        splits = self.num_splits
        while splits < self.max_splits and busy * splits < self.fill:
            splits *= 2
        return dataclasses.replace(self, num_splits=splits, min_split_blocks=1)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    prefill: PrefillBlocks
    decode: DecodeBlocks

    def __post_init__(self) -> None:
        sizes = (self.prefill.rows, self.prefill.block_kv, self.decode.block_kv, self.decode.num_splits,
                 self.decode.max_splits)
        if any(s < 1 or s & (s - 1) for s in sizes) or min(self.prefill.rows, self.prefill.block_kv,
                                                             self.decode.block_kv) < 16:
            raise ValueError(f"block sizes must be powers of two, rows and block_kv >= 16: {self}")


# Untuned fallbacks that compile within Hopper's and Ampere's shared memory: one for K/V rows of up
# to 256 bytes (head dim 128 in 16 bits, 64 in float32), one for wider rows.
DEFAULT_GPU = BlockSizes(
    prefill=PrefillBlocks(rows=64, block_kv=32, num_warps=4, num_stages=2),
    decode=DecodeBlocks(block_kv=64, num_splits=4, min_split_blocks=8, num_warps=4, num_stages=2,
                        prefetch_pages=False),
)
DEFAULT_GPU_WIDE = BlockSizes(
    prefill=PrefillBlocks(rows=32, block_kv=16, num_warps=4, num_stages=2, prefetch_pages=False),
    decode=DecodeBlocks(block_kv=32, num_splits=4, min_split_blocks=16, num_warps=4, num_stages=2,
                        prefetch_pages=False),
)

# Small blocks for the CPU interpreter: tests meet several KV blocks, splits and query blocks, and
# programs that loop over several blocks or items.
INTERPRET = BlockSizes(
    prefill=PrefillBlocks(rows=16, block_kv=16, num_warps=4, num_stages=1, programs=4),
    decode=DecodeBlocks(block_kv=16, num_splits=4, min_split_blocks=2, num_warps=4, num_stages=1, programs=16,
                        fill=0),
)

# (device kind prefix, head dim, KV dtype) -> sizes. Device kinds as jax reports them. Measured with
# bench/kernel_bench.py --sweep (bench/RESULTS.md, 2026-11-22); float16 uses the bfloat16 rows.
_H100_BF16_HD128 = BlockSizes(
    prefill=PrefillBlocks(rows=256, block_kv=64, num_warps=8, num_stages=2),
    decode=DecodeBlocks(block_kv=64, num_splits=4, min_split_blocks=8, num_warps=4, num_stages=3,
                        prefetch_pages=False),
)
TUNED: dict[tuple[str, int, str], BlockSizes] = {
    ("NVIDIA H100", 128, "bfloat16"): _H100_BF16_HD128,
    # Checked for correctness on an H100 (tests), not tuned: float32 caches are for testing.
    ("NVIDIA H100", 128, "float32"): BlockSizes(
        prefill=PrefillBlocks(rows=64, block_kv=32, num_warps=4, num_stages=2),
        decode=DecodeBlocks(block_kv=32, num_splits=4, min_split_blocks=8, num_warps=4, num_stages=2),
    ),
    # Same SM (sm_90, same shared memory) as the H100; not measured on an H200.
    ("NVIDIA H200", 128, "bfloat16"): _H100_BF16_HD128,
}


def block_sizes_for(device_kind: str, head_dim: int, dtype_name: str) -> BlockSizes:
    """The tuned sizes for this device (longest matching kind prefix), else a safe default."""
    dtype_name = "bfloat16" if dtype_name == "float16" else dtype_name
    best, best_len = None, -1
    for (kind, hd, dt), sizes in TUNED.items():
        if hd == head_dim and dt == dtype_name and device_kind.startswith(kind) and len(kind) > best_len:
            best, best_len = sizes, len(kind)
    if best is not None:
        return best
    row_bytes = head_dim * (4 if dtype_name == "float32" else 2)
    return DEFAULT_GPU if row_bytes <= 256 else DEFAULT_GPU_WIDE
