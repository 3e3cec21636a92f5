"""The attention ABI shared by the runner, the models and every ragged paged attention kernel.

Owns: the layout of one step's attention metadata and of the paged KV cache.
Must not: hold request state or import anything from the host scheduler.

A step is one flat, padded stream of T tokens from R requests (prefill chunks and decodes mixed).
Shapes are fixed by the runner's buckets, so any kernel behind this ABI compiles once per bucket.

KV cache, one array per layer: [2, P, S, K, H] (K and V stacked on axis 0; P pages of S slots; K kv
heads; H head dim). Page 0 is never handed to a request: padding tokens write their K/V there, so
the scatter needs no mask.

KV cache groups: layers with different attention windows may keep their KV in separate page pools
(ModelConfig.kv_cache_windows), so one request has one page table and slot mapping per group. A
kernel still sees one: the model hands it `md.for_group(g)` for its layer's group. In a sliding
group, pages that left the window are 0 in the page table; the window mask hides those positions.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array  # [T] int32, absolute position of each token in its sequence (padding: 0)
    slot_mapping: jax.Array  # [T] int32, page * S + offset where the token's K/V is written (padding: 0..S-1)
    token_seq: jax.Array  # [T] int32, row of page_table/seq_lens owning the token (padding: 0)
    page_table: jax.Array  # [R, P_max] int32, pages of each request in order (padding: 0)
    seq_lens: jax.Array  # [R] int32, KV length of each request after this step (padding rows: 0)
    # KV cache groups 1.. (group 0 uses page_table/slot_mapping above): [R, P_max] and [T] int32
    # each. Empty when every layer shares group 0's pool.
    group_page_tables: tuple[jax.Array, ...] = ()
    group_slot_mappings: tuple[jax.Array, ...] = ()

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata a kernel gets for a layer of KV cache group `group`: that group's tables."""
        if group == 0 or not self.group_page_tables:
            return self
        return dataclasses.replace(
            self,
            page_table=self.group_page_tables[group - 1],
            slot_mapping=self.group_slot_mappings[group - 1],
            group_page_tables=(),
            group_slot_mappings=(),
        )


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_pages, page_size, num_kv_heads, head_dim)
