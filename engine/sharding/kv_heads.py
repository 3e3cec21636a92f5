"""KV heads for tensor parallelism: replicated at load when shards outnumber them.

Owns: deciding how many kv heads a sharded model runs with, refusing a shard count the query
heads cannot split, and rewriting the checkpoint's k/v projection tensors (and the config) so that each
shard owns whole copies of the kv heads its query heads use. Must not: repeat heads at run time
(the cache would hold tp / K copies of every token written by one shard and read by another; here
each copy is written and read by one shard only), or touch anything but k/v projections: q/k
norms act per head_dim and are shared by every head.

GQA with N query heads and K kv heads: query head i = j*G + m (G = N / K, m < G) reads kv head j.
Replicating each kv head r times (head j becomes heads j*r .. j*r + r-1) gives K' = K*r heads and
groups of G' = G / r, and query head i then reads head i // G' = j*r + m // G', one of the copies of
head j, so the model's math is unchanged. K' = lcm(K, tp) is the fewest heads that split over tp
shards, and it always works once tp divides N: N is then a multiple of both K and tp, so of K'.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from engine.models.config import ModelConfig
from engine.sharding.config import LayoutError

_KV_PROJ = re.compile(r"\.self_attn\.[kv]_proj\.(weight|bias)$")
_QKV_PROJ = re.compile(r"\.self_attn\.qkv_proj\.(weight|bias)$")  # fused rows [q; k; v] (Phi-3)


@dataclasses.dataclass(frozen=True)
class KVHeadPlan:
    num_kv_heads: int  # in the checkpoint
    sharded_kv_heads: int  # what the sharded model runs with: a multiple of num_kv_heads and of tp

    @property
    def copies(self) -> int:
        return self.sharded_kv_heads // self.num_kv_heads


def plan_kv_heads(config: ModelConfig, tensor_parallel: int) -> KVHeadPlan:
    """How many kv heads the model runs with over `tensor_parallel` shards, or LayoutError."""
    n, k, tp = config.num_heads, config.num_kv_heads, tensor_parallel
    if n % tp:
        raise LayoutError(
            f"{config.architecture} has {n} attention heads, which --num-shard {tp} cannot split evenly; "
            f"shard counts that work: {[t for t in range(1, n + 1) if n % t == 0]}"
        )
    sharded = math.lcm(k, tp)  # divides n: n is a multiple of both k and tp
    return KVHeadPlan(num_kv_heads=k, sharded_kv_heads=sharded)


def _repeat_heads(x: np.ndarray, num_heads: int, copies: int) -> np.ndarray:
    """Rows [K*H, ...] -> [K*copies*H, ...], each head's block of H rows repeated in place."""
    heads = x.reshape(num_heads, -1, *x.shape[1:])  # [K, H, ...]
    return np.repeat(heads, copies, axis=0).reshape(-1, *x.shape[1:])


def sharded_config(config: ModelConfig, plan: KVHeadPlan) -> ModelConfig:
    """The config the sharded model runs with (its kv head count after replication)."""
    return dataclasses.replace(config, num_kv_heads=plan.sharded_kv_heads)


def replicate_kv_heads(
    tensors: Mapping[str, np.ndarray], plan: KVHeadPlan, *, num_heads: int, head_dim: int
) -> dict[str, np.ndarray]:
    """Checkpoint tensors (HF names and layout) rewritten for `plan.sharded_kv_heads` kv heads.

    Tensors other than k/v projections are passed through untouched (not copied).
    """
    out = dict(tensors)
    if plan.copies == 1:
        return out
    k, h = plan.num_kv_heads, head_dim
    for name, value in tensors.items():
        if _KV_PROJ.search(name):
            out[name] = _repeat_heads(np.asarray(value), k, plan.copies)
        elif _QKV_PROJ.search(name):
            q, kk, v = np.split(np.asarray(value), [num_heads * h, (num_heads + k) * h], axis=0)
            out[name] = np.concatenate(
                [q, _repeat_heads(kk, k, plan.copies), _repeat_heads(v, k, plan.copies)], axis=0
            )
    return out
