"""Tests for `serving.block_manager`: page allocation, reference counts, fork, copy-on-write and
the prefix cache (hash chains, reuse, LRU eviction that spares pages in use)."""

from __future__ import annotations

import pytest

from serving.block_manager import BlockManager, hash_page


def all_free(bm: BlockManager) -> bool:
    return bm.num_free_pages == bm.num_usable_pages and all(
        bm.ref_count(p) == 0 for p in range(bm.num_pages)
    )


def test_page_zero_is_never_handed_out():
    bm = BlockManager(num_pages=5, page_size=4)
    assert bm.num_usable_pages == 4
    pages = bm.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4]
    assert bm.num_free_pages == 0
    assert not bm.can_allocate(1)
    with pytest.raises(RuntimeError, match="out of KV-cache pages"):
        bm.allocate(1)


def test_usage_and_can_allocate_track_allocation():
    bm = BlockManager(num_pages=9, page_size=2)
    assert bm.usage == 0.0
    assert bm.can_allocate(8) and not bm.can_allocate(9)
    pages = bm.allocate(2)
    assert bm.usage == pytest.approx(0.25)
    assert bm.num_free_pages == 6
    bm.free(pages)
    assert bm.usage == 0.0
    assert all_free(bm)


def test_double_free_and_bad_pages_raise():
    bm = BlockManager(num_pages=4, page_size=2)
    [page] = bm.allocate(1)
    bm.free([page])
    with pytest.raises(ValueError, match="double free"):
        bm.free([page])
    with pytest.raises(ValueError, match="not an allocatable page"):
        bm.free([0])
    with pytest.raises(ValueError, match="not an allocatable page"):
        bm.free([4])
    with pytest.raises(ValueError, match="double free"):
        bm.fork([page])
    assert all_free(bm)


def test_freed_pages_are_reused_least_recently_freed_first():
    bm = BlockManager(num_pages=5, page_size=1)
    a, b, c, d = bm.allocate(4)
    bm.free([c])
    bm.free([a, b])  # released tail first: b, then a
    assert bm.allocate(3) == [c, b, a]
    assert d not in (a, b, c)


def test_fork_shares_pages_until_every_holder_frees():
    bm = BlockManager(num_pages=6, page_size=4)
    table = bm.allocate(3)
    child = bm.fork(table)
    assert child == table and child is not table
    assert [bm.ref_count(p) for p in table] == [2, 2, 2]
    bm.free(table)
    assert [bm.ref_count(p) for p in child] == [1, 1, 1]
    assert bm.num_free_pages == 2
    bm.free(child)
    assert all_free(bm)


def test_prepare_write_appends_pages_to_cover_the_write():
    bm = BlockManager(num_pages=8, page_size=4)
    table: list[int] = []
    assert bm.pages_needed(table, 0, 9) == 3
    assert bm.prepare_write(table, 0, 9) == []
    assert len(table) == 3
    # Positions 9..11 live in the third page: nothing new.
    assert bm.pages_needed(table, 9, 12) == 0
    assert bm.prepare_write(table, 9, 12) == []
    assert len(table) == 3
    assert bm.prepare_write(table, 12, 13) == []
    assert len(table) == 4
    assert bm.num_free_pages == 3


def test_copy_on_write_of_a_shared_partial_page():
    bm = BlockManager(num_pages=8, page_size=4)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 6)  # two pages, the second half full
    child = bm.fork(parent)
    shared_last = parent[1]

    assert bm.pages_needed(child, 6, 7) == 1
    copies = bm.prepare_write(child, 6, 7)
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == shared_last and dst == child[1] and dst != src
    assert child[0] == parent[0]  # the full prefix page stays shared
    assert bm.ref_count(parent[0]) == 2
    assert bm.ref_count(shared_last) == 1 and bm.ref_count(dst) == 1

    # The last holder of the formerly shared page writes in place.
    assert bm.prepare_write(parent, 6, 7) == []
    assert parent[1] == shared_last

    bm.free(parent)
    bm.free(child)
    assert all_free(bm)


def test_write_past_a_shared_full_page_takes_a_new_page_without_copy():
    bm = BlockManager(num_pages=8, page_size=4)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 8)
    child = bm.fork(parent)
    assert bm.prepare_write(child, 8, 9) == []
    assert child[:2] == parent and len(child) == 3


def test_copy_on_write_of_several_pages_in_one_write():
    bm = BlockManager(num_pages=10, page_size=2)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 5)  # pages for [0,2) [2,4) [4,6)
    child = bm.fork(parent)
    copies = bm.prepare_write(child, 3, 8)  # touches pages 1, 2 and a new page 3
    assert [src for src, _ in copies] == parent[1:3]
    assert [dst for _, dst in copies] == child[1:3]
    assert child[0] == parent[0] and len(child) == 4
    assert bm.num_free_pages == 9 - 3 - 3


def test_prepare_write_is_all_or_nothing():
    bm = BlockManager(num_pages=4, page_size=2)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 3)
    child = bm.fork(parent)
    # Copying the shared page and appending one more needs 2 pages; 1 is free.
    assert bm.pages_needed(child, 3, 5) == 2 and not bm.can_write(child, 3, 5)
    before = list(child)
    with pytest.raises(RuntimeError, match="out of KV-cache pages"):
        bm.prepare_write(child, 3, 5)
    assert child == before
    assert [bm.ref_count(p) for p in child] == [2, 2]
    assert bm.num_free_pages == 1


@pytest.mark.parametrize(
    ("num_pages", "page_size", "field"), [(1, 4, "num_pages"), (4, 0, "page_size")]
)
def test_constructor_validation_names_the_field(num_pages, page_size, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BlockManager(num_pages=num_pages, page_size=page_size)


# --- prefix cache ------------------------------------------------------------------------------


def chain(pages_of_tokens: list[list[int]]) -> list[bytes]:
    hashes, parent = [], None
    for tokens in pages_of_tokens:
        parent = hash_page(parent, tokens)
        hashes.append(parent)
    return hashes


def test_page_hashes_chain_the_whole_prefix():
    a = chain([[1, 2], [3, 4]])
    b = chain([[9, 9], [3, 4]])
    assert a[0] != b[0] and a[1] != b[1]  # same tokens, different prefix
    assert chain([[1, 2], [3, 4]]) == a
    assert hash_page(None, [1, 2]) != hash_page(None, [2, 1])
    assert hash_page(None, [1, 2]) != hash_page(None, [1, 2, 0])


def test_freed_registered_pages_stay_cached_and_can_be_attached_again():
    bm = BlockManager(num_pages=6, page_size=2)
    table = bm.allocate(3)
    hashes = chain([[1, 2], [3, 4], [5, 6]])
    for page, h in zip(table, hashes[:2], strict=False):
        bm.register(page, h)
    bm.free(table)
    assert all_free(bm)  # cached pages nobody holds count as free
    assert (bm.num_cached_pages, bm.num_evictable_pages) == (2, 2)
    assert bm.cached_prefix(hashes) == table[:2]
    assert bm.cached_prefix(chain([[1, 2], [9, 9]])) == table[:1]
    assert bm.cached_prefix(chain([[3, 4]])) == []  # the same tokens as a first page differ
    assert bm.pages_to_attach(table[:2]) == 2
    attached = bm.attach(table[:2])
    assert attached == table[:2] and [bm.ref_count(p) for p in attached] == [1, 1]
    assert bm.num_free_pages == 3 and bm.num_evictable_pages == 0
    other = bm.attach(bm.cached_prefix(hashes))  # a second holder shares them
    assert [bm.ref_count(p) for p in other] == [2, 2] and bm.pages_to_attach(other) == 0
    bm.free(attached)
    bm.free(other)
    assert all_free(bm) and bm.num_evictable_pages == 2


def test_fresh_pages_come_from_uncached_ones_first_then_the_least_recently_freed_cached():
    bm = BlockManager(num_pages=7, page_size=1)
    pages = bm.allocate(4)
    hashes = chain([[t] for t in range(4)])
    for page, h in zip(pages, hashes, strict=True):
        bm.register(page, h)
    bm.free([pages[2]])
    bm.free([pages[0], pages[1]])  # tail first: pages[1], then pages[0]
    bm.free([pages[3]])
    # LRU order of the cached pages is now 2, 1, 0, 3; two never-cached pages go first.
    uncached = bm.allocate(2)
    assert not set(uncached) & set(pages) and bm.num_cached_pages == 4
    assert bm.allocate(2) == [pages[2], pages[1]]
    assert bm.num_cached_pages == 2
    assert bm.cached_prefix(hashes) == pages[:1]  # the chain breaks at its evicted second page
    assert bm.page_hash(pages[2]) is None and bm.page_hash(pages[0]) == hashes[0]


def test_eviction_never_takes_a_page_in_use():
    bm = BlockManager(num_pages=5, page_size=2)
    held = bm.allocate(2)
    hashes = chain([[1, 1], [2, 2]])
    for page, h in zip(held, hashes, strict=True):
        bm.register(page, h)
    fresh = bm.allocate(2)
    assert not set(fresh) & set(held)
    assert not bm.can_allocate(1)
    with pytest.raises(RuntimeError, match="out of KV-cache pages"):
        bm.allocate(1)
    assert bm.cached_prefix(hashes) == held  # still cached and intact
    bm.free(fresh)
    bm.free(held[1:])
    # One cached page is free now; taking three pages evicts it but not the held one.
    bm.allocate(3)
    assert bm.cached_prefix(hashes) == held[:1] and bm.ref_count(held[0]) == 1


def test_a_prefix_computed_twice_stays_cached_once():
    bm = BlockManager(num_pages=5, page_size=2)
    first, second = bm.allocate(1), bm.allocate(1)
    h = hash_page(None, [4, 2])
    bm.register(first[0], h)
    bm.register(second[0], h)
    bm.register(first[0], hash_page(None, [0, 0]))  # already registered: unchanged
    assert bm.page_hash(first[0]) == h and bm.page_hash(second[0]) is None
    bm.free(first)
    bm.free(second)
    assert bm.num_evictable_pages == 1 and bm.cached_prefix([h]) == first


def test_cached_pages_are_never_written_and_attach_checks_pages():
    bm = BlockManager(num_pages=6, page_size=2)
    table: list[int] = []
    bm.prepare_write(table, 0, 3)
    bm.register(table[0], hash_page(None, [1, 2]))
    with pytest.raises(ValueError, match="cached full page"):
        bm.prepare_write(table, 1, 3)
    assert bm.prepare_write(table, 3, 4) == []  # past the cached page: fine
    with pytest.raises(ValueError, match="not in the prefix cache"):
        bm.attach([table[1]])
    with pytest.raises(ValueError, match="double free"):
        bm.register(5, hash_page(None, [0, 0]))
