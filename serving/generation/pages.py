"""Free-page allocator for the paged KV cache: one page table per sequence, all-or-nothing growth.

Pages are owned by exactly one sequence or free; `release(owner)` returns all of an owner's pages,
so a sequence that finishes, is cancelled, fails or is preempted cannot leak any.
"""

from __future__ import annotations

from typing import Hashable, Iterable


def pages_for(num_tokens: int, page_size: int) -> int:
  """Pages holding `num_tokens` tokens."""
  return -(-num_tokens // page_size)


class PagePool:
  """`num_pages` pages of `page_size` tokens; `reserved` pages (the null page) are never handed out."""

  def __init__(self, num_pages: int, page_size: int, *, reserved: Iterable[int] = (0,)):
    reserved = set(reserved)
    if not reserved <= set(range(num_pages)):
      raise ValueError(f"reserved pages {sorted(reserved)} outside [0, {num_pages})")
    self.page_size = page_size
    self.num_pages = num_pages
    # A stack, lowest page on top, so allocation order is deterministic.
    self._free = [p for p in range(num_pages - 1, -1, -1) if p not in reserved]
    self.capacity = len(self._free)
    if self.capacity < 1:
      raise ValueError(f"no usable pages: {num_pages} pages, reserved {sorted(reserved)}")
    self._tables: dict[Hashable, list[int]] = {}

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.capacity - len(self._free)

  @property
  def usage(self) -> float:
    """Fraction of usable pages owned by sequences."""
    return self.num_used / self.capacity

  def table(self, owner: Hashable) -> list[int]:
    """The owner's pages in position order (page i holds tokens [i*page_size, (i+1)*page_size))."""
    return self._tables.get(owner, [])

  def reserve(self, owner: Hashable, num_tokens: int) -> bool:
    """Grows the owner's table to hold `num_tokens`; False (and no change) if pages run out."""
    table = self._tables.get(owner, [])
    need = pages_for(num_tokens, self.page_size) - len(table)
    if need <= 0:
      return True
    if need > len(self._free):
      return False
    table.extend(self._free.pop() for _ in range(need))
    self._tables[owner] = table
    return True

  def release(self, owner: Hashable) -> int:
    """Frees every page of `owner`; returns how many."""
    table = self._tables.pop(owner, [])
    self._free.extend(reversed(table))
    return len(table)

  def owners(self) -> list[Hashable]:
    return list(self._tables)

  def check(self) -> None:
    """Raises AssertionError unless every usable page is either free or owned exactly once."""
    owned = [p for t in self._tables.values() for p in t]
    seen = owned + self._free
    if len(seen) != len(set(seen)):
      raise AssertionError("a page is owned twice, or both owned and free")
    if len(seen) != self.capacity:
      raise AssertionError(f"{self.capacity - len(seen)} pages leaked")
