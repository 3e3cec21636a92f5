"""Tests for engine/kv_cache.py: the page allocator's accounting, page 0, and misuse detection."""

from __future__ import annotations

import pytest

from engine.kv_cache import OutOfPagesError, PageAllocator


def test_capacity_excludes_reserved_page_zero():
    alloc = PageAllocator(num_pages=9, page_size=16)
    assert alloc.num_usable_pages == 8
    assert alloc.num_free_pages == 8
    assert alloc.capacity_tokens == 128
    assert alloc.usage() == 0.0
    assert alloc.is_full_free()


def test_allocate_never_hands_out_page_zero_and_pages_are_distinct():
    alloc = PageAllocator(num_pages=9, page_size=4)
    first = alloc.allocate(3)
    rest = alloc.allocate(5)
    assert first == [1, 2, 3]
    assert sorted(first + rest) == list(range(1, 9))
    assert alloc.num_free_pages == 0
    assert alloc.usage() == 1.0
    assert not alloc.can_allocate(1)
    assert alloc.can_allocate(0)
    assert alloc.allocate(0) == []


def test_free_returns_pages_and_usage_tracks():
    alloc = PageAllocator(num_pages=5, page_size=2)
    pages = alloc.allocate(2)
    assert alloc.usage() == 0.5
    alloc.free(pages)
    assert alloc.is_full_free()
    # Freed pages come back in their original order, which keeps page tables readable in logs.
    assert alloc.allocate(2) == pages


def test_out_of_pages_raises_and_changes_nothing():
    alloc = PageAllocator(num_pages=4, page_size=2)
    alloc.allocate(2)
    with pytest.raises(OutOfPagesError):
        alloc.allocate(2)
    assert alloc.num_free_pages == 1


@pytest.mark.parametrize(
    ("num_tokens", "pages"), [(0, 0), (1, 1), (15, 1), (16, 1), (17, 2), (32, 2), (33, 3)]
)
def test_pages_for_rounds_up(num_tokens, pages):
    assert PageAllocator(num_pages=4, page_size=16).pages_for(num_tokens) == pages


def test_double_free_raises():
    alloc = PageAllocator(num_pages=5, page_size=2)
    pages = alloc.allocate(2)
    alloc.free(pages)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(pages[:1])


def test_duplicate_page_in_one_free_raises_before_freeing_anything():
    alloc = PageAllocator(num_pages=5, page_size=2)
    pages = alloc.allocate(2)
    with pytest.raises(ValueError, match="double free"):
        alloc.free([pages[0], pages[1], pages[0]])
    assert alloc.num_free_pages == 2
    alloc.free(pages)
    assert alloc.is_full_free()


@pytest.mark.parametrize("page", [0, -1, 5, 100])
def test_freeing_reserved_or_out_of_range_page_raises(page):
    alloc = PageAllocator(num_pages=5, page_size=2)
    alloc.allocate(4)
    with pytest.raises(ValueError, match="not a usable page"):
        alloc.free([page])
    assert alloc.num_free_pages == 0


def test_free_of_never_allocated_page_raises():
    alloc = PageAllocator(num_pages=5, page_size=2)
    with pytest.raises(ValueError, match="double free"):
        alloc.free([3])


@pytest.mark.parametrize(("num_pages", "page_size"), [(1, 16), (0, 16), (4, 0)])
def test_bad_config_raises(num_pages, page_size):
    with pytest.raises(ValueError):
        PageAllocator(num_pages, page_size)


def test_bad_arguments_raise():
    alloc = PageAllocator(num_pages=4, page_size=2)
    with pytest.raises(ValueError):
        alloc.pages_for(-1)
    with pytest.raises(ValueError):
        alloc.allocate(-1)
