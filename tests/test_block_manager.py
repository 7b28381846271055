"""Tests for `serving.block_manager`: page allocation, reference counts, fork and copy-on-write."""

from __future__ import annotations

import pytest

from serving.block_manager import BlockManager


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
