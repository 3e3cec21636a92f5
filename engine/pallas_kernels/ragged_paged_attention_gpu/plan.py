"""Work lists of one step for the GPU kernels, computed on device from the attention metadata.

Owns: turning the flat token stream into query blocks (prefill kernel) and single-token items
(decode kernel), each with its request row and the KV range its tokens see. Must not: touch q, k, v
or the cache, or depend on anything but the metadata and static sizes (it runs inside the jit, so
the lists have static capacities and the used entries come first).

Runs: maximal stretches of consecutive tokens of one request that see at least one key. A token
that sees none (padding sent to an empty row) is in no run and no work list: the caller writes 0 for
it. Padding that joined the last request's run would turn a lone decode into a prefill block over
its whole context (measured: 18 us per layer on an H100 at one stream). A run of one token is a
decode item; longer runs are cut into blocks of `block_tokens`. Capacities assume each request's
tokens are contiguous in the stream (the runner's layout): at most R + 2 runs (every row, and
padding that points at a live row).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata

# Prefill block fields (rows of `Plan.blocks`) and decode item fields (rows of `Plan.decodes`).
ROW, TOK, NTOK, KV_LO, KV_HI = range(5)
D_ROW, D_TOK, D_KV_LO, D_KV_HI = range(4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Plan:
    bounds: jax.Array  # [2, T] int32: [lo, hi) of the KV positions each token sees (hi <= lo: none)
    blocks: jax.Array  # [5, NB] int32: row, first token, tokens, kv lo, kv hi (unused: 0 tokens)
    decodes: jax.Array  # [4, ND] int32: row, token, kv lo, kv hi (unused: token T, empty range)
    counts: jax.Array  # [2] int32: used blocks, used decode items


def capacities(num_tokens: int, num_rows: int, block_tokens: int) -> tuple[int, int]:
    """Static lengths (NB, ND) of the block and decode lists for a bucket."""
    runs = min(num_tokens, num_rows + 2)
    # Each run adds at most one partial block beyond T / block_tokens; a block's run has >= 2 tokens,
    # so a 1-token bucket has no block at all (the caller launches no prefill kernel).
    return min(num_tokens // 2, -(-num_tokens // block_tokens) + runs), runs


def key_bounds(md: AttentionMetadata, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) per token, the ABI's rule: j < seq_len, j <= pos, and j > pos - window. [T], [T]."""
    hi = jnp.minimum(md.seq_lens[md.token_seq], md.positions + 1)
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(md.positions - sliding_window + 1, 0)
    return lo, hi


def build_plan(md: AttentionMetadata, *, block_tokens: int, sliding_window: int | None) -> Plan:
    t_len = md.positions.shape[0]
    nb, nd = capacities(t_len, md.seq_lens.shape[0], block_tokens)
    t = jnp.arange(t_len, dtype=jnp.int32)
    lo, hi = key_bounds(md, sliding_window)  # [T], [T]
    live = hi > lo

    key = jnp.where(live, md.token_seq, -1)  # [T]: -1 marks tokens that are in no run
    change = key[1:] != key[:-1]  # [T-1]
    first = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), change]), t, 0))  # [T]
    last = jax.lax.cummin(jnp.where(jnp.concatenate([change, jnp.ones(1, bool)]), t, t_len), reverse=True)
    run_len, offset = last - first + 1, t - first  # [T], [T]
    row = jnp.maximum(key, 0)  # [T]
    single = (run_len == 1) & live
    multi = (run_len > 1) & live

    # Prefill blocks: every block_tokens-th token of a longer run starts one; list index = cumsum.
    starts = multi & (offset % block_tokens == 0)  # [T]
    blk = jnp.cumsum(starts) - 1  # [T]: the block of each token of a longer run
    at_start = jnp.where(starts, blk, nb)  # out of range: dropped
    head = jnp.stack([row, t, jnp.minimum(block_tokens, run_len - offset)])  # [3, T]
    blocks_head = jnp.zeros((3, nb), jnp.int32).at[:, at_start].set(head, mode="drop")
    # KV range of a block: union over its live tokens (min lo, max hi), as one scatter-min.
    member = jnp.where(multi, blk, nb)
    big = jnp.iinfo(jnp.int32).max
    ranges = jnp.full((2, nb), big, jnp.int32).at[:, member].min(jnp.stack([lo, -hi]), mode="drop")
    b_lo, b_hi = ranges[0], -ranges[1]
    empty = b_hi <= b_lo
    blocks = jnp.concatenate([blocks_head, jnp.where(empty, 0, jnp.stack([b_lo, b_hi]))])

    # Decode items: one per single-token run.
    d_at = jnp.where(single, jnp.cumsum(single) - 1, nd)
    d_vals = jnp.stack([row, t, jnp.where(live, lo, 0), jnp.where(live, hi, 0)])  # [4, T]
    unused = jnp.array([0, t_len, 0, 0], jnp.int32)[:, None]
    decodes = jnp.broadcast_to(unused, (4, nd)).at[:, d_at].set(d_vals, mode="drop")

    counts = jnp.minimum(jnp.stack([starts.sum(dtype=jnp.int32), single.sum(dtype=jnp.int32)]),
                         jnp.array([nb, nd], jnp.int32))
    return Plan(bounds=jnp.stack([lo, hi]).astype(jnp.int32), blocks=blocks.astype(jnp.int32),
                decodes=decodes.astype(jnp.int32), counts=counts)
