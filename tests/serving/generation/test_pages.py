"""PagePool: all-or-nothing growth, the null page is never handed out, nothing leaks (no JAX)."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import pytest

from serving.generation.pages import PagePool, pages_for


def test_pages_for():
  assert [pages_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_reserve_grows_in_position_order_and_release_returns_all():
  pool = PagePool(8, 4)  # page 0 reserved: 7 usable
  assert pool.capacity == 7 and pool.num_free == 7
  assert pool.reserve("a", 5)  # 2 pages
  assert pool.table("a") == [1, 2]
  assert pool.reserve("a", 8)  # still 2 pages
  assert pool.reserve("a", 9)  # a third
  assert pool.table("a") == [1, 2, 3]
  assert pool.reserve("b", 4) and pool.table("b") == [4]
  assert pool.num_used == 4 and pool.usage == pytest.approx(4 / 7)
  assert pool.release("a") == 3
  assert pool.table("a") == [] and pool.num_free == 6
  assert pool.release("a") == 0  # a second release is harmless
  pool.check()


def test_reserve_is_all_or_nothing():
  pool = PagePool(4, 2)  # 3 usable
  assert pool.reserve("a", 4)  # 2 pages
  assert not pool.reserve("b", 4)  # needs 2, 1 free
  assert pool.table("b") == [] and pool.num_free == 1
  assert not pool.reserve("a", 7)  # needs 2 more
  assert pool.table("a") == [1, 2]
  pool.check()


def test_validation():
  with pytest.raises(ValueError, match="outside"):
    PagePool(4, 2, reserved=(4,))
  with pytest.raises(ValueError, match="no usable pages"):
    PagePool(1, 2)


def _take_all(pool: PagePool, owner: str) -> list[int]:
  """Reserves every usable page for `owner` (True only if none is lost) and returns its table."""
  assert pool.reserve(owner, pool.capacity * pool.page_size), (pool.num_free, pool.capacity)
  assert not pool.reserve(owner + "+", 1)  # and there is not one page more
  return sorted(pool.table(owner))


def test_released_pages_are_all_handed_out_again():
  pool = PagePool(6, 2, reserved=(0, 3))  # usable: 1, 2, 4, 5
  assert pool.reserve("a", 3) and pool.reserve("b", 1) and pool.reserve("c", 2)
  assert pool.num_free == 0 and not pool.reserve("d", 1)
  assert pool.release("b") == 1 and pool.release("a") == 2
  assert pool.table("c") == [5] and pool.num_free == 3
  assert pool.release("c") == 1
  assert _take_all(pool, "all") == [1, 2, 4, 5]  # nothing lost, the reserved pages never
  pool.check()


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.booleans()),
                           max_size=60))
def test_random_operations_keep_every_page_accounted(ops):
  pool = PagePool(16, 4, reserved=(0, 7))
  usable = set(range(16)) - {0, 7}
  for owner, tokens, release in ops:
    before = list(pool.table(owner))
    if release:
      assert pool.release(owner) == len(before)
      assert pool.table(owner) == []
    elif pool.reserve(owner, tokens):
      assert len(pool.table(owner)) == max(len(before), pages_for(tokens, 4))
      assert pool.table(owner)[:len(before)] == before
    else:
      assert pool.table(owner) == before
      assert pages_for(tokens, 4) - len(before) > pool.num_free  # refused only when short
    # Our own accounting: owned pages are usable, never shared, and the rest are free.
    owned = [p for o in pool.owners() for p in pool.table(o)]
    assert len(owned) == len(set(owned)) and set(owned) <= usable
    assert pool.num_used == len(owned) and pool.num_free == len(usable) - len(owned)
    pool.check()
  for owner in pool.owners():
    pool.release(owner)
  assert pool.num_free == pool.capacity == 14
  assert _take_all(pool, "all") == sorted(usable)
