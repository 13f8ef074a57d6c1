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


def test_check_catches_a_leak():
  pool = PagePool(4, 2)
  pool.reserve("a", 2)
  pool._free.pop()  # simulate a lost page
  with pytest.raises(AssertionError, match="leaked"):
    pool.check()


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 40), st.booleans()),
                           max_size=60))
def test_random_operations_keep_every_page_accounted(ops):
  pool = PagePool(16, 4, reserved=(0, 7))
  for owner, tokens, release in ops:
    before = list(pool.table(owner))
    if release:
      pool.release(owner)
    elif pool.reserve(owner, tokens):
      assert len(pool.table(owner)) == max(len(before), pages_for(tokens, 4))
      assert pool.table(owner)[:len(before)] == before
    else:
      assert pool.table(owner) == before
    assert 0 not in pool.table(owner) and 7 not in pool.table(owner)
    pool.check()
  for owner in pool.owners():
    pool.release(owner)
  assert pool.num_free == pool.capacity == 14
