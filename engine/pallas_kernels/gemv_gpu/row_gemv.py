"""The one-row projection a decoder layer calls: the GEMV kernel with its tiling picked.

Owns: `RowGemv`, a static (hashable) callable a model holds like its attention function. Must not:
decide when a layer runs one row (the layer does) or run on a mesh (fused projections exist only
on one device: engine.models.fuse).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from engine.pallas_kernels.gemv_gpu.kernel import gemv
from engine.pallas_kernels.gemv_gpu.tuned_block_sizes import GemvBlocks, blocks_for


@dataclasses.dataclass(frozen=True)
class RowGemv:
    """y = epilogue(W x) for one row x [1, K] and W [N, K]; see kernel.py for the epilogues.

    device_kind picks tuned tilings (jax's `device_kind`, e.g. "NVIDIA H100 80GB HBM3");
    interpret runs the kernel in the Pallas interpreter (tests on CPU)."""

    device_kind: str = ""
    interpret: bool = False

    def blocks(self, n: int, k: int, *, gated: bool = False, rope_dim: int | None = None) -> GemvBlocks | None:
        return blocks_for(n, k, gated=gated, rope_dim=rope_dim, device_kind=self.device_kind)

    def supports(self, n: int, k: int, *, gated: bool = False, rope_dim: int | None = None) -> bool:
        return self.blocks(n, k, gated=gated, rope_dim=rope_dim) is not None

    def __call__(
        self,
        x: jax.Array,  # [1, K]
        w: jax.Array,  # [N, K]
        *,
        residual: jax.Array | None = None,
        bias: jax.Array | None = None,
        rms_eps: float | None = None,
        act: Callable[[jax.Array], jax.Array] | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,  # cos, sin [1, H]
        rope_heads: int | None = None,
    ) -> jax.Array:  # [1, N] (gated: [1, N / 2])
        rope_dim = None if rope is None else rope[0].shape[-1]
        blocks = self.blocks(*w.shape, gated=act is not None, rope_dim=rope_dim)
        if blocks is None:
            raise ValueError(f"no GEMV tiling fits a {tuple(w.shape)} weight; check supports() first")
        return gemv(x, w, residual=residual, bias=bias, rms_eps=rms_eps, act=act, rope=rope, rope_heads=rope_heads,
                    blocks=blocks, interpret=self.interpret)
