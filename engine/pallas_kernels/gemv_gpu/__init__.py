"""One-row projections for NVIDIA GPUs: a Pallas (Triton) GEMV with a decoder layer's neighbouring
work fused in (a folded norm's 1/rms, the residual add, SiLU x up, bias).

Owns: the package's public names. Must not: pick itself for a platform (dispatch.py does).

A decode step of one request multiplies one row by each weight. XLA reads the weight near the copy
rate but leaves the work around each product to launches of their own; here a Llama layer's four
projections carry it (bench/RESULTS.md, 2026-11-23, fifth pass). `gemv_reference` is the same math
in plain JAX, which the kernel is tested against.
"""

from __future__ import annotations

from engine.pallas_kernels.gemv_gpu.kernel import gemv, gemv_reference
from engine.pallas_kernels.gemv_gpu.row_gemv import RowGemv
from engine.pallas_kernels.gemv_gpu.tuned_block_sizes import GemvBlocks, blocks_for

__all__ = ["GemvBlocks", "RowGemv", "blocks_for", "gemv", "gemv_reference"]
