"""Pure-JAX ragged paged attention: the portable implementation of the attention ABI, and its oracle.

Owns: `ragged_paged_attention` (the blocked, memory-bounded reference every platform can run and
every kernel is checked against) and `naive_ragged_paged_attention` (dense and obviously correct;
tests only). Must not: depend on a platform, reduce across tokens (a token's result may depend only
on its own request), or materialize the gathered context of the whole step at once.

Semantics (see metadata.py for the layout): the step's K/V are first written into the cache at
`slot_mapping`; token t of request r = token_seq[t] at position p = positions[t] then attends over
KV positions j < seq_lens[r] with j <= p (and j > p - sliding_window when set, as HF does).
Shape legend beyond the house one: Q queries in a tile, B KV positions in a block, L whole context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata

# KV positions visited per loop iteration (rounded to whole pages). Fixed, never derived from the
# batch's shapes: block boundaries decide the online-softmax rounding, so they must be the same for
# a request whether it runs alone or in a batch.
_BLOCK_TOKENS = 128
# Queries per sequential tile: bounds live memory to one tile by one KV block for any step size.
_Q_TILE = 64
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, kv_cache: jax.Array) -> None:
    if q.ndim != 3 or k.ndim != 3 or kv_cache.ndim != 5:
        raise ValueError(
            f"expected q [T, N, H], k/v [T, K, H], kv_cache [2, P, S, K, H]; got q {q.shape}, "
            f"k {k.shape}, kv_cache {kv_cache.shape}"
        )
    t, n, h = q.shape
    _, _, _, kh, hc = kv_cache.shape
    if k.shape != (t, kh, h) or v.shape != k.shape or hc != h or kv_cache.shape[0] != 2:
        raise ValueError(
            f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, kv_cache {kv_cache.shape}"
        )
    if n % kh:
        raise ValueError(f"q heads ({n}) must be a multiple of kv heads ({kh})")


def write_kv(kv_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatters the step's K/V into the cache; padding tokens land in the trash page 0."""
    with jax.named_scope("cache_update"):
        _, p, s, kh, h = kv_cache.shape
        flat = kv_cache.reshape(2, p * s, kh, h)  # [2, P*S, K, H]
        new = jnp.stack([k, v]).astype(kv_cache.dtype)  # [2, T, K, H]
        return flat.at[:, slot_mapping].set(new, mode="promise_in_bounds").reshape(kv_cache.shape)


def _key_bounds(md: AttentionMetadata, sliding_window: int | None) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) of the KV positions each token may see, per token: [T], [T]."""
    hi = jnp.minimum(md.seq_lens[md.token_seq], md.positions + 1)
    lo = jnp.zeros_like(hi) if sliding_window is None else jnp.maximum(md.positions - sliding_window + 1, 0)
    return lo, hi


def _logits(qg: jax.Array, keys: jax.Array, sm_scale: float, soft_cap: float | None) -> jax.Array:
    # qg [T, K, G, H] f32, keys [T, B, K, H] -> [T, K, G, B] f32
    s = jnp.einsum("tkgh,tbkh->tkgb", qg, keys.astype(jnp.float32), precision=_HIGHEST) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    return s


def ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_q_heads: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Writes k/v into the cache, then attends each token over its request's pages, block by block.

    q [T, N, H], k/v [T, K, H], kv_cache [2, P, S, K, H] -> (out [T, N, H] in q's dtype, new cache).
    `num_q_heads`: q may be a fused projection [T, N + more, H] whose first N heads are the queries
    (the rest, k and v, are ignored here); out is [T, N, H] either way.
    """
    q = q if num_q_heads is None else q[:, :num_q_heads]
    _check_shapes(q, k, v, kv_cache)
    kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
    with jax.named_scope("attention"):
        out = _blocked_attention(q, kv_cache, md, sm_scale, sliding_window, soft_cap)
    return out, kv_cache


def _blocked_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> jax.Array:
    t, n, h = q.shape
    _, _, s, kh, _ = kv_cache.shape
    ppb = max(1, _BLOCK_TOKENS // s)  # pages per block
    # Pad the table to whole blocks with the trash page: those slots are always masked out.
    page_table = jnp.pad(md.page_table, ((0, 0), (0, -md.page_table.shape[1] % ppb)))  # [R, Pb]
    lo, hi = _key_bounds(md, sliding_window)  # [T], [T]
    tq = min(_Q_TILE, t)
    pad = -t % tq  # padded query rows see no keys (hi = 0) and are sliced off
    tiles = (
        jnp.pad(q.astype(jnp.float32), ((0, pad), (0, 0), (0, 0))).reshape(-1, tq, kh, n // kh, h),
        jnp.pad(page_table[md.token_seq], ((0, pad), (0, 0))).reshape(-1, tq, page_table.shape[1]),
        jnp.pad(lo, (0, pad)).reshape(-1, tq),
        jnp.pad(hi, (0, pad)).reshape(-1, tq),
    )
    # Query tiles run one after another so live memory is one tile by one KV block, whatever T.
    out = jax.lax.map(lambda x: _attend_tile(*x, kv_cache, ppb, sm_scale, soft_cap), tiles)
    return out.reshape(-1, n, h)[:t].astype(q.dtype)


def _attend_tile(
    qg: jax.Array,
    tok_pages: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    kv_cache: jax.Array,
    ppb: int,
    sm_scale: float,
    soft_cap: float | None,
) -> jax.Array:
    """Online softmax over KV blocks for one tile of queries: qg [Q, K, G, H] f32 -> [Q, K, G, H] f32."""
    tq, kh, g, h = qg.shape
    bk = ppb * kv_cache.shape[2]  # KV positions per block
    # The trip count is the only thing shared across tokens; blocks past a token's keys are fully
    # masked, and a fully masked block leaves (m, l, acc) bit-for-bit unchanged.
    num_blocks = jnp.minimum((jnp.max(hi) + bk - 1) // bk, tok_pages.shape[1] // ppb)

    def body(b, carry):
        m, l, acc = carry  # [Q, K, G], [Q, K, G], [Q, K, G, H]
        pages = jax.lax.dynamic_slice_in_dim(tok_pages, b * ppb, ppb, axis=1)  # [Q, ppb]
        kv = kv_cache[:, pages].reshape(2, tq, bk, kh, h)  # [2, Q, B, K, H]
        j = b * bk + jnp.arange(bk, dtype=jnp.int32)  # [B]
        mask = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [Q, B]
        logits = _logits(qg, kv[0], sm_scale, soft_cap)  # [Q, K, G, B]
        logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, logits.max(axis=-1))  # [Q, K, G]
        # Rows with nothing seen yet keep m = -inf; shift by 0 there so exp never sees inf - inf.
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
        alpha = jnp.exp(m - m_safe)  # [Q, K, G]
        p = jnp.exp(logits - m_safe[..., None])  # [Q, K, G, B]
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("qkgb,qbkh->qkgh", p, kv[1].astype(jnp.float32), precision=_HIGHEST)
        return m_new, l, alpha[..., None] * acc + pv

    init = (
        jnp.full((tq, kh, g), -jnp.inf, jnp.float32),
        jnp.zeros((tq, kh, g), jnp.float32),
        jnp.zeros((tq, kh, g, h), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    # Rows that saw no key (padding, empty windows) give 0, never NaN.
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


def naive_ragged_paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_cache: jax.Array,
    md: AttentionMetadata,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_q_heads: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Test oracle: gathers every token's whole context densely, then one masked softmax."""
    q = q if num_q_heads is None else q[:, :num_q_heads]
    _check_shapes(q, k, v, kv_cache)
    t, n, h = q.shape
    _, p, s, kh, _ = kv_cache.shape
    kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
    flat = kv_cache.reshape(2, p * s, kh, h)  # [2, P*S, K, H]

    # Written out independently of the blocked path (no shared helpers), so a bug in one shows.
    slots = md.page_table[:, :, None] * s + jnp.arange(s)  # [R, Pm, S]
    slots = slots.reshape(slots.shape[0], -1)[md.token_seq]  # [T, L]: position j of token's request
    keys = flat[0][slots].astype(jnp.float32)  # [T, L, K, H]
    vals = flat[1][slots].astype(jnp.float32)  # [T, L, K, H]
    j = jnp.arange(slots.shape[1])[None, :]  # [1, L]
    p_tok = md.positions[:, None]  # [T, 1]
    visible = (j < md.seq_lens[md.token_seq][:, None]) & (j <= p_tok)  # [T, L]
    if sliding_window is not None:
        visible &= j > p_tok - sliding_window
    visible = visible[:, None, None, :]  # [T, 1, 1, L]

    qg = q.astype(jnp.float32).reshape(t, kh, n // kh, h)  # [T, K, G, H]
    logits = jnp.einsum("tkgh,tlkh->tkgl", qg, keys, precision=_HIGHEST) * sm_scale  # [T, K, G, L]
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    peak = jnp.max(jnp.where(visible, logits, -1e30), axis=-1, keepdims=True)
    w = jnp.where(visible, jnp.exp(logits - peak), 0.0)
    denom = w.sum(axis=-1, keepdims=True)
    w = w / jnp.where(denom > 0, denom, 1.0)  # rows that see nothing stay all-zero
    out = jnp.einsum("tkgl,tlkh->tkgh", w, vals, precision=_HIGHEST)
    return out.reshape(t, n, h).astype(q.dtype), kv_cache
