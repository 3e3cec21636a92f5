"""Attention split over kv heads: each tensor-parallel shard runs the attention function on its own
query heads, kv heads and cache slice, with no communication.

Owns: wrapping any AttentionFn (the pure-JAX reference or a Pallas kernel) in a shard_map over the
"model" mesh axis. Must not: change what attention computes, or name PartitionSpecs itself (the
layouts are rules.ATTN_Q, rules.ATTN_KV and rules.KV_CACHE).

Why: a Pallas kernel is an opaque custom call, so the automatic partitioner would gather the whole
cache onto every shard to run it; and even the reference's cache scatter is cheaper done per shard.
Splitting is exact: kv heads are replicated at load so that shard s's query heads read only kv heads
shard s holds (engine.sharding.kv_heads). The step's metadata is replicated: every shard reads all of it.
The mesh comes from the tracing context (jax.set_mesh), so the wrapper also works inside the
data-parallel shard_map of engine.sharding.replicas.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from engine.models.base import AttentionFn
from engine.sharding import rules
from engine.sharding.mesh import MODEL, tensor_parallel


def shard_attention(attention_fn: AttentionFn, mesh: Mesh) -> AttentionFn:
    """attention_fn run per "model" shard of `mesh`; attention_fn itself when there is one shard."""
    if tensor_parallel(mesh) == 1:
        return attention_fn
    q_spec = rules.partition_spec(mesh, rules.ATTN_Q)
    kv_spec = rules.partition_spec(mesh, rules.ATTN_KV)
    cache_spec = rules.partition_spec(mesh, rules.KV_CACHE)
    whole = rules.partition_spec(mesh, ())

    @functools.wraps(attention_fn)
    def sharded(q, k, v, kv_cache, md, *, sm_scale, sliding_window=None, soft_cap=None, num_q_heads=None):
        if num_q_heads is not None:  # heads shard by position: a fused q/k/v would split wrongly
            raise ValueError("a sharded model keeps q, k and v apart (no fused projections under a mesh)")
        def local(q, k, v, kv_cache, md):  # [T, N/tp, H], [T, K/tp, H], [2, P, S, K/tp, H]
            return attention_fn(q, k, v, kv_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                                soft_cap=soft_cap)

        return jax.shard_map(
            local,
            in_specs=(q_spec, kv_spec, kv_spec, cache_spec, whole),
            out_specs=(q_spec, cache_spec),
            axis_names={MODEL},
            # The kernels' loops start from constants and never communicate: nothing to check.
            check_vma=False,
        )(q, k, v, kv_cache, md)

    return sharded
