"""A tiny paged "engine" for tests: shuffled pages, one step's metadata at a time.

Owns: test-side bookkeeping of which pages hold which request's KV and how long each request is,
turning a list of (request, new tokens) chunks into a padded ragged step, and a jitted model step.
Must not: be used by the engine itself (the real allocator and scheduler live elsewhere) or hide
padding: every step it builds has padding tokens and padding rows, so kernels meet them always.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata


@dataclasses.dataclass
class _Seq:
    pages: list[int] = dataclasses.field(default_factory=list)
    length: int = 0  # tokens whose K/V the cache holds


@dataclasses.dataclass(frozen=True)
class Step:
    input_ids: jnp.ndarray  # [T] int32 (padding: 0)
    md: AttentionMetadata
    token_index: tuple[np.ndarray, ...]  # per chunk, the indices of its tokens in the stream
    row: tuple[int, ...]  # per chunk, its row of page_table/seq_lens


class TinyPagedEngine:
    """Pages come from a shuffled free list (never page 0), so no request's pages are contiguous."""

    def __init__(self, *, num_pages: int, page_size: int, seed: int) -> None:
        self.page_size = page_size
        self.rng = np.random.default_rng(seed)
        self.free = [int(p) for p in self.rng.permutation(np.arange(1, num_pages))]
        self.seqs: dict[Hashable, _Seq] = {}

    def length(self, seq_id: Hashable) -> int:
        return self.seqs[seq_id].length if seq_id in self.seqs else 0

    def _grow(self, seq: _Seq, new_len: int) -> None:
        while len(seq.pages) * self.page_size < new_len:
            if not self.free:
                raise ValueError("TinyPagedEngine ran out of pages")
            seq.pages.append(self.free.pop())

    def advance(self, seq_id: Hashable, n: int) -> None:
        """Pretends n tokens of context were already cached (their K/V is whatever the cache holds)."""
        seq = self.seqs.setdefault(seq_id, _Seq())
        self._grow(seq, seq.length + n)
        seq.length += n

    def slots(self, seq_id: Hashable) -> np.ndarray:
        """Flat cache slot of every cached position of the request: [length]."""
        seq = self.seqs[seq_id]
        j = np.arange(seq.length)
        return np.asarray(seq.pages, np.int64)[j // self.page_size] * self.page_size + j % self.page_size

    def step(
        self,
        chunks: Sequence[tuple[Hashable, Sequence[int]]],
        *,
        num_tokens: int,
        num_rows: int,
        max_pages: int,
        shuffle_rows: bool = True,
    ) -> Step:
        """Schedules each chunk's tokens after its request's cached ones, then commits them.

        Rows are placed in random order among padding rows (seq_len 0), so row 0, which padding
        tokens point at, is sometimes a real request and sometimes empty.
        """
        total = sum(len(toks) for _, toks in chunks)
        # Leave room for padding, always, but in a 1-token bucket (a lone decode fills it).
        if (total >= num_tokens and num_tokens > 1) or total > num_tokens or len(chunks) >= num_rows:
            raise ValueError(
                f"{total} tokens / {len(chunks)} rows leave no padding in {num_tokens} / {num_rows}"
            )
        order = self.rng.permutation(num_rows) if shuffle_rows else np.arange(num_rows)
        s = self.page_size
        ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slot_mapping = np.arange(num_tokens, dtype=np.int32) % s  # padding writes land in page 0
        token_seq = np.zeros(num_tokens, np.int32)
        page_table = np.zeros((num_rows, max_pages), np.int32)
        seq_lens = np.zeros(num_rows, np.int32)
        token_index, rows, t = [], [], 0
        for i, (seq_id, toks) in enumerate(chunks):
            seq = self.seqs.setdefault(seq_id, _Seq())
            n, r = len(toks), int(order[i])
            self._grow(seq, seq.length + n)
            if len(seq.pages) > max_pages:
                raise ValueError(f"request {seq_id!r} needs {len(seq.pages)} pages > max_pages {max_pages}")
            pos = np.arange(seq.length, seq.length + n)
            idx = np.arange(t, t + n)
            ids[idx], positions[idx], token_seq[idx] = toks, pos, r
            slot_mapping[idx] = np.asarray(seq.pages)[pos // s] * s + pos % s
            page_table[r, : len(seq.pages)] = seq.pages
            seq.length += n
            seq_lens[r] = seq.length
            token_index.append(idx)
            rows.append(r)
            t += n
        md = AttentionMetadata(
            positions=jnp.asarray(positions),
            slot_mapping=jnp.asarray(slot_mapping),
            token_seq=jnp.asarray(token_seq),
            page_table=jnp.asarray(page_table),
            seq_lens=jnp.asarray(seq_lens),
        )
        return Step(jnp.asarray(ids), md, tuple(token_index), tuple(rows))


def model_step_fn(model):
    """A jitted (input_ids [T], caches, md) -> (logits [T, V] float32, new caches) for a CausalLM."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, input_ids, kv_caches, md):
        m = nnx.merge(graphdef, state)
        hidden, kv_caches = m(input_ids, kv_caches, md)
        return m.compute_logits(hidden), kv_caches

    return lambda input_ids, kv_caches, md: step(state, input_ids, kv_caches, md)
