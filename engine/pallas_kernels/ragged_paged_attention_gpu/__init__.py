"""Ragged paged attention for NVIDIA GPUs: Pallas kernels (Triton lowering) behind the attention ABI.

Owns: the package's public names. Must not: pick itself for a platform (dispatch.py does).

Same call and semantics as `ragged_paged_attention.reference.ragged_paged_attention`: the step's K/V
are scattered into the cache (the reference's XLA scatter; in a 1-token bucket of a fused q/k/v,
`num_q_heads`, the decode kernel writes them itself), then every token attends over its
request's KV positions [lo, hi), causal, with an optional sliding window and logit soft-cap. Mixed
prefill and decode in one call, any GQA group, page sizes from 1 up, float32/bfloat16/float16 caches;
head dims that are not a power of two >= 16 fall back to the reference.

How one step runs (all inside the caller's jit, grids static per bucket):
1. plan.py builds work lists from the metadata: runs of one request's consecutive tokens; a run of
   one token is a decode item, longer runs are cut into query blocks.
2. The prefill kernel, per (kv head, query block): its rows are the block's tokens x the kv head's
   q heads, so K/V blocks are read once per kv head; it walks only the KV blocks its rows can see
   (causal and window ranges skip whole blocks), masks only edge blocks, writes normalized output.
3. The decode kernel, per (kv head, split, decode item): a long context is split into up to
   `num_splits` stretches (flash-decoding) so few requests still fill the GPU; it writes float32
   partials (max, denominator, output) that the merge kernel combines, per decode item and kv
   head, into the output (`combine` is the same merge in plain JAX).
Grids are capped (`programs`) and programs loop over the used work, so empty capacity is cheap.
Block sizes come from tuned_block_sizes.py (per device kind, head dim and dtype).

Limits: each request's tokens must be contiguous in the stream (the runner's layout; tokens that see
no key may sit anywhere), else the work lists overflow and some outputs are left unwritten. Results
depend only on a request's own tokens and the block sizes (batch-invariant, like the reference),
not bit-equal to the reference. The Pallas Triton backend is deprecated in jax 0.11 (a warning at
lowering) but is the working GPU Pallas path on 0.11.x (jax ships no Mosaic GPU paged attention).

Measured on an H100 (bench/RESULTS.md, 2026-11-22; bf16, 32 q / 8 kv heads, head dim 128, pages of
16): decode B=64 at context 2048 in 229 us per call, 2.35 TB/s of KV (the kernel alone 200 us,
2.68 TB/s); prefill of one 4096-token prompt at 248 TFLOP/s (causal), ~250x the reference.
"""

from __future__ import annotations

from engine.pallas_kernels.ragged_paged_attention_gpu.attention import ragged_paged_attention_gpu, supports
from engine.pallas_kernels.ragged_paged_attention_gpu.tuned_block_sizes import (
    BlockSizes,
    DecodeBlocks,
    PrefillBlocks,
    block_sizes_for,
)

__all__ = [
    "BlockSizes",
    "DecodeBlocks",
    "PrefillBlocks",
    "block_sizes_for",
    "ragged_paged_attention_gpu",
    "supports",
]
