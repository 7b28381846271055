"""`BlockManager`: the KV-cache page allocator (free list, reference counts, copy-on-write).

Owns which cache pages are free and how many block tables point at each used page. Pure Python;
the engine performs the actual K/V writes and the page copies this module records. Page 0 is never
handed out: the engine parks padding tokens' K/V there. Every page leaves and re-enters the free
list through `_take_page` / `_release_page`, the two places automatic prefix caching would hook
into (hashing full pages and keeping released ones cached until evicted).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

RESERVED_PAGE = 0


class BlockManager:
    """Hands out pages `1..num_pages-1` and reference-counts them.

    A block table is a plain `list[int]` of page ids owned by one sequence: entry `i` holds the K/V
    of positions `[i * page_size, (i + 1) * page_size)`. Sequences forked from one another share
    pages (refcount > 1) until one of them writes into a shared page, which then gets its own copy.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages: must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Released pages go to the back and are taken from the front, so the least recently freed
        # page is reused first: the order an LRU prefix cache wants.
        self._free: deque[int] = deque(range(1, num_pages))
        self._refs = [0] * num_pages

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the allocatable pages in use, in [0, 1]."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_pages

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def pages_for(self, num_tokens: int) -> int:
        """Pages a block table needs to hold `num_tokens` positions."""
        return -(-num_tokens // self.page_size)

    def allocate(self, num: int) -> list[int]:
        """Takes `num` fresh pages, each with refcount 1."""
        if not self.can_allocate(num):
            raise RuntimeError(f"out of KV-cache pages: need {num}, {self.num_free_pages} free")
        return [self._take_page() for _ in range(num)]

    def free(self, pages: Iterable[int]) -> None:
        """Drops one reference to each page; a page with no references left becomes free.

        Tail pages are released first so that a table's pages re-enter the free list tail-first,
        keeping the prefix pages (the ones most worth caching later) around longest.
        """
        for page in reversed(list(pages)):
            self._release_page(page)

    def fork(self, pages: Iterable[int]) -> list[int]:
        """A new block table sharing every page of `pages` (each refcount += 1)."""
        shared = list(pages)
        for page in shared:
            self._check_used(page)
            self._refs[page] += 1
        return shared

    def pages_needed(self, block_table: list[int], start: int, end: int) -> int:
        """Fresh pages that writing positions `[start, end)` through `block_table` would take:
        pages appended to cover `[0, end)` plus copies of shared pages the write touches."""
        first, last = start // self.page_size, (end - 1) // self.page_size
        appended = max(0, last + 1 - len(block_table))
        touched = block_table[first : last + 1]
        shared = sum(1 for page in touched if self._refs[page] > 1)
        return appended + shared

    def can_write(self, block_table: list[int], start: int, end: int) -> bool:
        return self.can_allocate(self.pages_needed(block_table, start, end))

    def prepare_write(self, block_table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Makes `block_table` (in place) cover `[0, end)` with pages it alone owns over
        `[start, end)`, and returns the `(src, dst)` copies the engine must perform, in this order,
        before writing. All or nothing: raises without changing anything when pages are short."""
        if end <= start:
            raise ValueError(f"empty write [{start}, {end})")
        need = self.pages_needed(block_table, start, end)
        if not self.can_allocate(need):
            raise RuntimeError(f"out of KV-cache pages: need {need}, {self.num_free_pages} free")
        first, last = start // self.page_size, (end - 1) // self.page_size
        copies: list[tuple[int, int]] = []
        for i in range(first, min(last + 1, len(block_table))):
            src = block_table[i]
            if self._refs[src] > 1:
                dst = self._take_page()
                self._refs[src] -= 1
                block_table[i] = dst
                copies.append((src, dst))
        while len(block_table) <= last:
            block_table.append(self._take_page())
        return copies

    def _take_page(self) -> int:
        page = self._free.popleft()
        self._refs[page] = 1
        return page

    def _release_page(self, page: int) -> None:
        self._check_used(page)
        self._refs[page] -= 1
        if self._refs[page] == 0:
            self._free.append(page)

    def _check_used(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page {page} is not an allocatable page (1..{self.num_pages - 1})")
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is not allocated (double free?)")
