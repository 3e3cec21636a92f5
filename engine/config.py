"""EngineConfig: every engine knob, frozen, built once from the CLI (TGI launcher names).

Owns: the user-facing limits and their validation, and `resolve_limits`, which turns the "auto"
values into concrete numbers once the model and the device memory are known, splitting the KV
memory between the KV cache groups. Must not: touch devices itself (callers pass in the memory
figures), read environment variables (the CLI does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.kv_cache import peak_pages
from engine.sharding.config import ShardingConfig

# Accepted spellings -> canonical name (a jnp dtype name).
DTYPES: Mapping[str, str] = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
# What the engine is verified in; float16 weights load, but nothing checks a float16 engine yet.
SERVED_DTYPES = ("bfloat16", "float32")


def parse_dtype(dtype: Any) -> str:
    """The canonical dtype name for a user's spelling; ValueError listing the choices otherwise."""
    key = dtype
    if not isinstance(key, str):
        try:
            key = np.dtype(key).name  # jnp.bfloat16, np.float32, ...
        except TypeError:
            key = repr(key)
    name = DTYPES.get(key.strip().lower())
    if name is None:
        raise ValueError(f"Unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    return name


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model_id: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    revision: str | None = None
    dtype: str = "bfloat16"
    max_batch_size: int = 32
    max_batch_prefill_tokens: int | None = None  # None: 4096 on accelerators, 512 on CPU
    max_batch_total_tokens: int | None = None  # KV capacity in tokens; None: from memory
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # None: min(max_position_embeddings, 4096)
    page_size: int = 16
    memory_fraction: float = 0.9  # of device memory the weights, KV cache and activations may use
    max_top_n_tokens: int = 5
    enable_chunked_prefill: bool = True
    # Prompt logprobs are computed 16 tokens at a time, so unlike TGI they cost no [T, V] buffer and
    # can stay on; off, requests for them get an empty prefill list, as TGI does.
    enable_prefill_logprobs: bool = True
    # Prepare and launch step n+1 while step n runs (engine.llm_engine); off: one step at a time.
    async_scheduling: bool = True
    min_token_bucket: int = 16
    # A 1-token bucket for steps that decode one request alone; None: on GPUs only (llm_engine says why).
    lone_decode_bucket: bool | None = None
    # q/k/v and gate/up as one matrix each, pre-norms folded in (engine.models.fuse); None: on one GPU
    # only (engine.served_model).
    fuse_projections: bool | None = None
    compilation_cache_dir: str | None = None
    # auto | reference | pallas (engine.pallas_kernels.dispatch checks the name at start-up).
    attention_backend: str = "auto"
    sharding: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)  # mesh, replicas, hosts

    def __post_init__(self) -> None:
        try:
            dtype = parse_dtype(self.dtype)
        except ValueError:
            dtype = None
        if dtype not in SERVED_DTYPES:
            raise ValueError(f"unsupported --dtype {self.dtype!r}; choose one of {list(SERVED_DTYPES)}")
        object.__setattr__(self, "dtype", dtype)
        for name in ("max_batch_size", "page_size", "min_token_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.page_size & (self.page_size - 1):
            raise ValueError("--page-size must be a power of two")
        for name in ("max_batch_prefill_tokens", "max_batch_total_tokens", "max_input_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError("--memory-fraction must be in (0, 1]")
        if self.max_top_n_tokens < 0:
            raise ValueError("--max-top-n-tokens must be >= 0")


@dataclasses.dataclass(frozen=True)
class KVGroupSpec:
    """What sizing needs to know of one KV cache group (see ModelConfig.kv_cache_windows)."""

    window: int | None  # None: full attention
    bytes_per_token: int  # K and V of every layer in the group, for one token


@dataclasses.dataclass(frozen=True)
class KVGroupLimits:
    window: int | None
    num_pages: int  # including the reserved page 0
    bytes_per_page: int  # K and V of every layer in the group


@dataclasses.dataclass(frozen=True)
class Limits:
    """The concrete numbers the scheduler and runner are built with."""

    max_batch_size: int
    max_batch_prefill_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    page_size: int
    token_buckets: tuple[int, ...]  # padded token counts per step, ascending
    request_buckets: tuple[int, ...]  # padded request counts per step, ascending
    kv_groups: tuple[KVGroupLimits, ...]  # one page pool per KV cache group, in the model's order
    # Tokens of KV the running batch may hold together (TGI's max_batch_total_tokens): the
    # full-attention pool's capacity. A model whose layers all slide has no such pool; its sliding
    # pools are sized for this many tokens of requests, at most a window and a chunk each.
    kv_capacity_tokens: int

    @property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_total_tokens / self.page_size)

    def check_request(
        self, ids: Sequence[int], max_new_tokens: int, top_n_tokens: int, *, max_top_n_tokens: int, vocab_size: int
    ) -> None:
        """Raises ValueError with TGI's wording when a tokenized request breaks a limit."""
        if not ids:
            raise ValueError("Input validation error: `inputs` cannot be empty")
        if len(ids) > self.max_input_tokens:
            raise ValueError(
                f"Input validation error: `inputs` tokens must be <= {self.max_input_tokens}. Given: {len(ids)}"
            )
        if len(ids) + max_new_tokens > self.max_total_tokens:
            raise ValueError(
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if top_n_tokens > max_top_n_tokens:
            raise ValueError(
                f"Input validation error: `top_n_tokens` must be >= 0 and <= {max_top_n_tokens}. "
                f"Given: {top_n_tokens}"
            )
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"Input validation error: token ids must be in [0, {vocab_size})")


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 2
    sizes.append(hi)
    return tuple(sizes)


def resolve_limits(
    cfg: EngineConfig,
    *,
    max_position_embeddings: int,
    kv_groups: Sequence[KVGroupSpec],
    free_memory_bytes: int,
    is_accelerator: bool,
    lone_decode_bucket: bool = False,
) -> Limits:
    """Fills the auto values and checks the combination, raising ValueError on a layout that can't work.

    free_memory_bytes is what the KV cache may take: memory_fraction of the device (or of host RAM on
    CPU) minus the weights, already net of an activation reserve. kv_groups: the model's KV cache
    groups in order; --max-batch-total-tokens sizes the full-attention one. lone_decode_bucket adds a
    1-token bucket below the powers of two, for steps that decode one request alone (see the caller).
    """
    if not kv_groups:
        raise ValueError("the model has no KV cache groups")
    max_total = cfg.max_total_tokens or min(max_position_embeddings, 4096)
    if max_total > max_position_embeddings:
        raise ValueError(
            f"--max-total-tokens ({max_total}) exceeds the model's max_position_embeddings ({max_position_embeddings})"
        )
    max_input = cfg.max_input_tokens or max_total - 1
    if max_input >= max_total:
        raise ValueError(f"--max-input-tokens ({max_input}) must be < --max-total-tokens ({max_total})")
    prefill = cfg.max_batch_prefill_tokens or (4096 if is_accelerator else 512)
    if not cfg.enable_chunked_prefill and prefill < max_input:
        raise ValueError(
            f"--max-batch-prefill-tokens ({prefill}) must be >= --max-input-tokens ({max_input}) without chunked prefill"
        )
    page_size = cfg.page_size
    # A sliding group never holds more of a request than its window and one chunk, so it gets as
    # many pages as the full-attention pool (it never holds more than that pool either) but at most
    # max_batch_size requests' peak: more could never be used.
    peaks = [peak_pages(g.window, max_total - 1, prefill, page_size) for g in kv_groups]
    caps = [None if g.window is None else cfg.max_batch_size * p for g, p in zip(kv_groups, peaks)]

    def group_pages(pages: int) -> list[int]:
        return [pages if cap is None else min(pages, cap) for cap in caps]

    def cost(pages: int) -> int:
        return sum(n * page_size * g.bytes_per_token for n, g in zip(group_pages(pages), kv_groups))

    # More KV than max_batch_size full-length requests can never be used, so don't take it.
    wanted = cfg.max_batch_total_tokens or cfg.max_batch_size * max_total
    pages = wanted // page_size
    if cost(pages) > free_memory_bytes:
        if cfg.max_batch_total_tokens is not None:
            raise ValueError(
                f"--max-batch-total-tokens {wanted} needs {cost(pages) / 2**30:.2f} GiB of KV cache "
                f"but only {free_memory_bytes / 2**30:.2f} GiB is free"
            )
        lo = 0  # the most pages affordable: cost is monotone in pages, so bisect
        while lo < pages:
            mid = (lo + pages + 1) // 2
            lo, pages = (mid, pages) if cost(mid) <= free_memory_bytes else (lo, mid - 1)
    if any(g.window is None for g in kv_groups) and pages * page_size < max_total:
        raise ValueError(
            f"the KV cache holds {pages * page_size} tokens, fewer than --max-total-tokens ({max_total}): "
            "lower --max-total-tokens or free memory"
        )
    kv_groups_limits = []
    for g, n, peak in zip(kv_groups, group_pages(pages), peaks):
        if g.window is not None and n < peak:  # the full-attention pool was checked above
            raise ValueError(
                f"the KV cache of the window-{g.window} layers holds {n} pages, fewer than one request of "
                f"--max-total-tokens ({max_total}) needs ({peak}): lower --max-total-tokens or free memory"
            )
        # + the reserved padding page
        kv_groups_limits.append(KVGroupLimits(g.window, n + 1, page_size * g.bytes_per_token))
    max_step_tokens = prefill + cfg.max_batch_size  # every running request also decodes each step
    tokens = _powers_of_two(min(cfg.min_token_bucket, max_step_tokens), max_step_tokens)
    if lone_decode_bucket and tokens[0] > 1:
        tokens = (1, *tokens)
    requests = _powers_of_two(1, cfg.max_batch_size)
    return Limits(
        max_batch_size=cfg.max_batch_size,
        max_batch_prefill_tokens=prefill,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        page_size=page_size,
        token_buckets=tokens,
        request_buckets=requests,
        kv_groups=tuple(kv_groups_limits),
        kv_capacity_tokens=pages * page_size,
    )
