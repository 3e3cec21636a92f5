"""PageAllocator: which KV cache pages are free, handed out and taken back by page number.

Owns: the free list of the paged KV cache and its bookkeeping (usage, leak checks).
Must not: import jax or numpy, touch the cache arrays (the runner owns them), or know about
requests. Page 0 is reserved (padding tokens write their K/V there, see
engine/pallas_kernels/ragged_paged_attention/metadata.py), so it is never handed out.
"""

from __future__ import annotations

from collections.abc import Iterable


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

    def usage(self) -> float:
        """Fraction of usable pages that are handed out, in [0, 1]."""
        return 1.0 - len(self._free_pages) / self.num_usable_pages

    def is_full_free(self) -> bool:
        """True when every usable page is back in the pool (for leak checks)."""
        return len(self._free_pages) == self.num_usable_pages
