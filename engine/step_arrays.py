"""Host arrays of one step: the flat token stream and its attention metadata, built with numpy.

Owns: turning a schedule's chunks into the fixed-shape int32 arrays the forward program reads
(token ids, positions, per-group slot mappings and page tables, rows, sequence lengths, logits
rows, and where a decode's token is still on the device). Must not: import jax, pick buckets (the
runner does) or touch requests' state. Works a whole step at a time: at a few hundred rows, one
numpy call per array instead of several per row keeps the host ahead of the device.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from engine.request import Request
from engine.scheduler import ScheduledChunk


@dataclasses.dataclass
class StepArrays:
    input_ids: np.ndarray  # [T]
    prev_index: np.ndarray  # [T]: row of the previous step's samples to read, -1 for none
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [G, T]: KV slot each token writes, per KV cache group
    token_seq: np.ndarray  # [T]: the row of each token
    page_table: np.ndarray  # [G, R_max, P]
    seq_lens: np.ndarray  # [R_max]
    logits_indices: np.ndarray  # [R_max]: each row's last token
    targets: np.ndarray | None  # [T]: the next prompt token of each token (prompt logprobs)


def build_step_arrays(
    chunks: Sequence[ScheduledChunk], *, t_pad: int, r_max: int, max_pages: int, page_size: int,
    num_groups: int, prev_rows: dict[int, int], want_targets: bool,
) -> StepArrays:
    """prev_rows: id(request) -> its row in the previous launched step (placeholder tokens)."""
    n_rows = len(chunks)
    lens = np.fromiter((c.num_tokens for c in chunks), np.int64, n_rows)  # [R]
    starts = np.fromiter((c.start for c in chunks), np.int64, n_rows)  # [R]
    ends = np.cumsum(lens)  # [R]
    n = int(ends[-1]) if n_rows else 0

    input_ids = np.zeros(t_pad, np.int32)
    input_ids[:n] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
    prev_index = np.full(t_pad, -1, np.int32)
    # Only a decode's one token can still be on the device (the previous step's sample).
    for row in np.flatnonzero(input_ids[ends - 1] == Request.PLACEHOLDER) if n_rows else ():
        prev_index[ends[row] - 1] = prev_rows[id(chunks[row].request)]

    token_seq = np.zeros(t_pad, np.int32)
    rows = np.repeat(np.arange(n_rows), lens)  # [N]
    token_seq[:n] = rows
    # Padding tokens keep position 0 / slot 0: they write into the reserved page 0. They point at an
    # empty row where there is one, so they see no key and attention skips them.
    token_seq[n:] = n_rows if n_rows < r_max else 0
    positions = np.zeros(t_pad, np.int32)
    positions[:n] = np.arange(n) - np.repeat(ends - lens - starts, lens)

    page_table = np.zeros((num_groups, r_max, max_pages), np.int32)
    slot_mapping = np.zeros((num_groups, t_pad), np.int32)
    pos = positions[:n]  # [N]
    for g in range(num_groups):
        # Entries of pages released from a sliding window are 0: the trash page, masked.
        group_pages = [c.request.pages[g] for c in chunks]
        counts = np.fromiter(map(len, group_pages), np.int64, n_rows)
        flat = np.fromiter(itertools.chain.from_iterable(group_pages), np.int32, int(counts.sum()))
        cols = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
        page_table[g, np.repeat(np.arange(n_rows), counts), cols] = flat
        assert page_table[g, np.arange(n_rows), starts // page_size].all(), "a step would write into a released page"
        slot_mapping[g, :n] = page_table[g, rows, pos // page_size] * page_size + pos % page_size

    seq_lens = np.zeros(r_max, np.int32)
    seq_lens[:n_rows] = starts + lens
    logits_indices = np.zeros(r_max, np.int32)
    logits_indices[:n_rows] = ends - 1
    targets = None
    if want_targets:
        targets = np.zeros(t_pad, np.int32)
        for row, c in enumerate(chunks):
            following = c.request.all_token_ids[c.start + 1 : c.start + c.num_tokens + 1]
            offset = int(ends[row] - lens[row])
            targets[offset : offset + len(following)] = following
    return StepArrays(input_ids, prev_index, positions, slot_mapping, token_seq, page_table, seq_lens,
                      logits_indices, targets)
