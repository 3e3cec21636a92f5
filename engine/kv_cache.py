"""PageAllocator and KV cache groups: which KV cache pages are free, per pool of layers.

Owns: the free list of each paged KV cache pool and its bookkeeping (usage, leak checks), and the
grouping of layers into pools by attention window (KVCacheGroup): full-attention layers share one
pool, each distinct sliding window has its own, so pages that left a window can be reused while
the request still runs. Must not: import jax or numpy, touch the cache arrays (the runner owns
them), or know about requests (the scheduler hands pages to them). Page 0 of every pool is
reserved (padding tokens write their K/V there, and freed window pages point there, see
engine/pallas_kernels/ragged_paged_attention/metadata.py), so it is never handed out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence


class OutOfPagesError(RuntimeError):
    """allocate() was asked for more pages than are free; callers check can_allocate() first."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"`num_pages` must be at least 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"`page_size` must be positive, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack popped from the end: reversed so a fresh allocator hands out 1, 2, 3, ...
        self._free_pages = list(range(num_pages - 1, 0, -1))
        # Per-page flag so free() catches double frees in O(1) per page.
        self._is_free = [True] * num_pages
        self._is_free[0] = False

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def capacity_tokens(self) -> int:
        return self.num_usable_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold the KV of num_tokens tokens."""
        if num_tokens < 0:
            raise ValueError(f"`num_tokens` must be non-negative, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free_pages)

    def allocate(self, num_pages: int) -> list[int]:
        if num_pages < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({num_pages})")
        if num_pages > len(self._free_pages):
            raise OutOfPagesError(f"asked for {num_pages} pages, only {len(self._free_pages)} are free")
        if num_pages == 0:
            return []
        pages = self._free_pages[-num_pages:]
        del self._free_pages[-num_pages:]
        pages.reverse()
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Returns pages to the pool. All-or-nothing: a bad page raises before anything is freed."""
        pages = list(pages)
        seen: set[int] = set()
        for page in pages:
            if not 0 < page < self.num_pages:
                raise ValueError(f"page {page} is not a usable page (valid: 1..{self.num_pages - 1})")
            if self._is_free[page] or page in seen:
                raise ValueError(f"double free of page {page}")
            seen.add(page)
        for page in pages:
            self._is_free[page] = True
        # Reversed so the next allocate() hands the same pages back in their original order.
        self._free_pages.extend(reversed(pages))

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self._free_pages)

    def usage(self) -> float:
        """Fraction of usable pages that are handed out, in [0, 1]."""
        return 1.0 - len(self._free_pages) / self.num_usable_pages

    def is_full_free(self) -> bool:
        """True when every usable page is back in the pool (for leak checks)."""
        return len(self._free_pages) == self.num_usable_pages


def peak_pages(window: int | None, num_kv_tokens: int, max_chunk_tokens: int, page_size: int) -> int:
    """The most pages of a window's group one request holds at once, when its KV reaches
    num_kv_tokens tokens and no step computes more than max_chunk_tokens of its tokens."""
    whole = -(-num_kv_tokens // page_size)
    if window is None:
        return whole
    # A step reads window - 1 positions before its first token and writes up to a chunk; the span
    # may straddle one more page boundary than its length suggests.
    return min(whole, -(-(window - 1 + max_chunk_tokens) // page_size) + 1)


@dataclasses.dataclass(frozen=True)
class KVCacheGroup:
    """The layers that share one attention window, with their own page pool.

    A request keeps one page list per group, indexed by logical page (position // page_size). In a
    sliding group the entries of pages that left the window are 0 (the trash page): they go back to
    the pool while the request runs, and attention masks those positions anyway.
    """

    window: int | None  # None: full causal attention
    allocator: PageAllocator

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"a sliding window must be positive, got {self.window}")

    def first_live_page(self, start: int) -> int:
        """Logical index of the first page a step whose tokens start at position `start` can read.

        Token p sees KV positions j > p - window, so the whole step reads nothing before
        start - window + 1, and neither does any later step.
        """
        if self.window is None:
            return 0
        return max(start - self.window + 1, 0) // self.allocator.page_size

    def peak_pages(self, num_kv_tokens: int, max_chunk_tokens: int) -> int:
        """The most pages a request with num_kv_tokens tokens of KV holds at once in this group."""
        return peak_pages(self.window, num_kv_tokens, max_chunk_tokens, self.allocator.page_size)


class KVCacheGroups:
    """Every KV cache group of a model, in the order of ModelConfig.kv_cache_windows()."""

    def __init__(self, groups: Sequence[KVCacheGroup]) -> None:
        if not groups:
            raise ValueError("at least one KV cache group is needed")
        sizes = {g.allocator.page_size for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"every KV cache group must use one page size, got {sorted(sizes)}")
        self.groups = tuple(groups)
        self.page_size = sizes.pop()

    @classmethod
    def single(cls, allocator: PageAllocator) -> KVCacheGroups:
        """One full-attention group: a model without sliding windows."""
        return cls([KVCacheGroup(None, allocator)])

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[KVCacheGroup]:
        return iter(self.groups)

    def __getitem__(self, index: int) -> KVCacheGroup:
        return self.groups[index]

    def pages_for(self, num_tokens: int) -> int:
        return self.groups[0].allocator.pages_for(num_tokens)

    def usage(self) -> float:
        """The most-used group's usage: the pool that runs out first is the one that matters."""
        return max(g.allocator.usage() for g in self.groups)

    def is_full_free(self) -> bool:
        return all(g.allocator.is_full_free() for g in self.groups)
