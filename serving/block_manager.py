"""`BlockManager`: the KV-cache page allocator (free list, reference counts, copy-on-write, and
the prefix cache).

Owns which cache pages are free, how many block tables point at each used page, and which full
pages hold a known token prefix. Pure Python; the engine performs the actual K/V writes and the
page copies this module records. Page 0 is never handed out: the engine parks padding tokens' K/V
there. Every page leaves and re-enters the free pool through `_take_page` / `_release_page`.

Prefix caching (vLLM's hash-chained full pages): a full page is identified by `hash_page(parent
hash, its token ids)`, so equal hashes mean equal whole prefixes. The scheduler `register`s a page
once its K/V is written; when its last holder frees it, it stays cached but evictable, and
`cached_prefix` / `attach` let a later sequence with the same prefix reuse it. Fresh pages come
from the never-cached free pages first, then by evicting the least recently released cached page;
a page someone holds is never evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

RESERVED_PAGE = 0


def hash_page(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
    """The identity of a full page: its parent page's hash (None for the first page) chained with
    its token ids. A cryptographic digest, so distinct prefixes never share cached K/V in practice
    (a collision would serve one request another's context)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    """Hands out pages `1..num_pages-1`, reference-counts them, and caches full pages by hash.

    A block table is a plain `list[int]` of page ids owned by one sequence: entry `i` holds the K/V
    of positions `[i * page_size, (i + 1) * page_size)`. Sequences forked from one another, or
    attached to the same cached prefix, share pages (refcount > 1); a shared page that one of them
    writes into gets its own copy first. Free pages include cached pages nobody holds.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages: must be >= 2 (page 0 is reserved), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size: must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Both pools are ordered by release time, oldest first, and handed out from the front.
        # `_free` holds pages with no cached content; `_evictable` cached pages nobody holds (LRU).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_pages
        self._page_hash: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}  # hash -> page holding that prefix

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        """Pages that can be handed out: never-cached ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache, held or evictable."""
        return len(self._cached)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the allocatable pages in use, in [0, 1]."""
        return 1.0 - self.num_free_pages / self.num_usable_pages

    def can_allocate(self, num: int) -> bool:
        return num <= self.num_free_pages

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def page_hash(self, page: int) -> bytes | None:
        return self._page_hash.get(page)

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

        Tail pages are released first so that a table's pages re-enter the free pool tail-first,
        keeping the prefix pages (the ones most worth caching) around longest.
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

    # ---- prefix cache -----------------------------------------------------------------------
    def register(self, page: int, page_hash: bytes) -> None:
        """Records that held page `page` is full and holds the prefix `page_hash` names. A no-op
        when the page is registered already or another page holds that prefix (two sequences
        computed it at once): the first copy stays the cached one."""
        self._check_used(page)
        if page in self._page_hash or page_hash in self._cached:
            return
        self._page_hash[page] = page_hash
        self._cached[page_hash] = page

    def cached_prefix(self, hashes: Iterable[bytes]) -> list[int]:
        """The pages holding the longest run of leading `hashes` that is cached. Takes nothing."""
        pages = []
        for h in hashes:
            page = self._cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def pages_to_attach(self, pages: Iterable[int]) -> int:
        """Free pages that attaching `pages` uses up: the evictable ones among them."""
        return sum(1 for page in pages if page in self._evictable)

    def attach(self, pages: Iterable[int]) -> list[int]:
        """A new block table holding the cached `pages` (from `cached_prefix`): each gets one more
        reference, and evictable ones leave the free pool."""
        table = list(pages)
        if self.pages_to_attach(table) > self.num_free_pages:
            raise RuntimeError("out of KV-cache pages")
        for page in table:
            if page not in self._page_hash:
                raise ValueError(f"page {page} is not in the prefix cache")
            self._evictable.pop(page, None)
            self._refs[page] += 1
        return table

    # ---- writes -----------------------------------------------------------------------------
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
            if src in self._page_hash:
                # Cached K/V must never change; only pages past the computed tokens are written.
                raise ValueError(f"write [{start}, {end}) into cached full page {src}")
            if self._refs[src] > 1:
                dst = self._take_page()
                self._refs[src] -= 1
                block_table[i] = dst
                copies.append((src, dst))
        while len(block_table) <= last:
            block_table.append(self._take_page())
        return copies

    def _take_page(self) -> int:
        if self._free:
            page, _ = self._free.popitem(last=False)
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._cached[self._page_hash.pop(page)]
        self._refs[page] = 1
        return page

    def _release_page(self, page: int) -> None:
        self._check_used(page)
        self._refs[page] -= 1
        if self._refs[page] == 0:
            (self._evictable if page in self._page_hash else self._free)[page] = None

    def _check_used(self, page: int) -> None:
        if not 0 < page < self.num_pages:
            raise ValueError(f"page {page} is not an allocatable page (1..{self.num_pages - 1})")
        if self._refs[page] == 0:
            raise ValueError(f"page {page} is not allocated (double free?)")
