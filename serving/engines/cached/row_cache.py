"""The host-side index of one table's device cache, and its admission and eviction policy.

The device holds `capacity` rows of the table (plus one scratch row that padded writes land
in); this index says which table row each cache slot holds, so a batch's lookups split into
hits (read from the cache) and misses (gathered from the host table and shipped with the
batch). Policy: LFU with aging. Every lookup counts towards its row's frequency; counters halve
once the table has seen `aging_lookups` lookups per cached row, so yesterday's hot rows fade.
A miss takes a free slot, else it replaces the least frequent of a random sample of cached
rows when it is more frequent than that row (sampled LFU, as Redis does: O(misses), never
O(capacity) per batch). No per-id Python: `plan` runs in C++ (plan.cc, the `_plan` extension
built with the package, GIL released) when it is built, else as vectorized numpy; both keep
the same index arrays and the same policy.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SAMPLE = 4  # victims sampled per admission candidate


@dataclasses.dataclass(slots=True)
class CacheStats:
  """Counters since load: lookups are id occurrences (valid ids only), unique per batch."""

  lookups: int = 0
  hits: int = 0
  unique: int = 0
  misses: int = 0  # unique rows gathered from the host
  inserts: int = 0
  evictions: int = 0
  invalidations: int = 0
  updated_rows: int = 0  # rows set by live updates
  batches: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPlan:
  """One table's part of a batch: `src` per valid lookup (slot < capacity: cache hit;
  capacity + i: row `miss_rows[i]` of the batch's miss buffer, counted from this table's
  first miss), and the admitted misses: miss `insert_from[k]` goes into slot `insert_slot[k]`."""

  src: np.ndarray  # int64 [lookups]
  miss_rows: np.ndarray  # int64 [misses] table rows to gather
  insert_slot: np.ndarray  # int64 [inserts]
  insert_from: np.ndarray  # int64 [inserts] index into miss_rows


class RowCache:
  """The index and policy of one table's device cache of `capacity` rows of `rows`."""

  def __init__(self, rows: int, capacity: int, *, aging_lookups: int = 16, seed: int = 0,
               native: bool = True):
    if not 0 < capacity < rows:
      raise ValueError(f"cache capacity {capacity} must be in (0, {rows})")
    self.rows, self.capacity = rows, capacity
    self.slot_of = np.full(rows, -1, np.int32)  # table row -> slot, -1: not cached
    self.row_of = np.full(capacity, -1, np.int64)  # slot -> table row, -1: free
    self.freq = np.zeros(rows, np.uint32)
    self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack of free slots
    # [free slots, lookups since aging, lookups per aging, xorshift state]: shared with plan.cc
    self._state = np.array([capacity, 0, aging_lookups * capacity, seed * 2654435761 + 1],
                           np.int64)
    self._rng = np.random.default_rng(seed)
    self._read = np.zeros(capacity, np.uint8)  # scratch: slots this batch reads (not evicted)
    self._native = load_planner() if native else None
    self.stats = CacheStats()

  @property
  def _nfree(self) -> int:
    return int(self._state[0])

  @_nfree.setter
  def _nfree(self, n: int) -> None:
    self._state[0] = n

  @property
  def native(self) -> bool:
    """Whether `plan` runs in C++."""
    return self._native is not None

  @property
  def occupancy(self) -> int:
    return self.capacity - self._nfree

  def warm(self, hot_rows: np.ndarray) -> int:
    """Fills free slots with `hot_rows` (hottest first) before traffic; returns slots filled.
    The caller copies those rows into the device cache (`cached_rows`)."""
    rows = np.asarray(hot_rows, np.int64)
    rows = rows[(rows >= 0) & (rows < self.rows)]
    _, first = np.unique(rows, return_index=True)
    rows = rows[np.sort(first)]
    rows = rows[self.slot_of[rows] < 0][:self._nfree]
    self._place(rows, self._pop_free(len(rows)))
    self.freq[rows] = np.maximum(self.freq[rows], 1)
    return len(rows)

  def cached_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(slots, table rows) of every occupied slot."""
    slots = np.flatnonzero(self.row_of >= 0)
    return slots, self.row_of[slots]

  def plan(self, rows: np.ndarray) -> BatchPlan:
    """Splits one batch's valid table rows into hits and misses and admits misses; updates
    the index as the device cache will be once this batch's writes land."""
    if self._native is not None:
      counts = np.zeros(6, np.int64)
      src, miss, slot, frm = self._native.plan(rows, self.slot_of, self.row_of, self.freq,
                                               self._free, self._read, self._state, counts)
      st = self.stats
      st.batches += 1
      for k, v in zip(("lookups", "hits", "unique", "misses", "inserts", "evictions"), counts):
        setattr(st, k, getattr(st, k) + int(v))
      return BatchPlan(src, miss, slot, frm)
    uniq, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
    self._count(uniq, counts)
    slots = self.slot_of[uniq].astype(np.int64)
    hit = slots >= 0
    miss_rows = uniq[~hit]
    src_uniq = slots
    src_uniq[~hit] = self.capacity + np.arange(len(miss_rows))
    insert_slot, insert_from = self._admit(miss_rows, protect=slots[hit])
    st = self.stats
    st.batches += 1
    st.lookups += len(rows)
    st.hits += int(counts[hit].sum())
    st.unique += len(uniq)
    st.misses += len(miss_rows)
    return BatchPlan(src_uniq[inverse].reshape(-1), miss_rows, insert_slot, insert_from)

  def invalidate(self, rows: np.ndarray) -> int:
    """Drops `rows` from the cache (their values changed on the host): later lookups miss
    and read the new values. Returns how many were cached."""
    rows = np.unique(np.asarray(rows, np.int64))
    slots = self.slot_of[rows]
    slots = slots[slots >= 0].astype(np.int64)
    self.slot_of[self.row_of[slots]] = -1
    self.row_of[slots] = -1
    self._free[self._nfree:self._nfree + len(slots)] = slots
    self._nfree += len(slots)
    self.stats.invalidations += len(slots)
    return len(slots)

  # -- policy --------------------------------------------------------------------------------

  def _count(self, uniq: np.ndarray, counts: np.ndarray) -> None:
    f = self.freq[uniq].astype(np.uint64) + counts
    self.freq[uniq] = np.minimum(f, np.iinfo(np.uint32).max)
    self._state[1] += int(counts.sum())
    if self._state[1] >= self._state[2]:
      np.right_shift(self.freq, 1, out=self.freq)
      self._state[1] = 0

  def _admit(self, miss_rows: np.ndarray, protect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(miss_rows)
    if n == 0:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(-self.freq[miss_rows].astype(np.int64), kind="stable")  # hottest first
    k_free = min(n, self._nfree)
    slots = [self._pop_free(k_free)]
    take = [order[:k_free]]
    rest = order[k_free:]
    if len(rest):
      victims = self._victims(len(rest), protect)
      vf = self.freq[self.row_of[victims]].astype(np.int64)
      by_cold = victims[np.argsort(vf, kind="stable")]
      m = min(len(rest), len(by_cold))
      win = self.freq[miss_rows[rest[:m]]].astype(np.int64) > np.sort(vf)[:m]
      evict = by_cold[:m][win]
      self.slot_of[self.row_of[evict]] = -1
      self.stats.evictions += len(evict)
      slots.append(evict)
      take.append(rest[:m][win])
    slot, src = np.concatenate(slots), np.concatenate(take)
    self._place(miss_rows[src], slot)
    self.stats.inserts += len(slot)
    return slot, src

  def _victims(self, n: int, protect: np.ndarray) -> np.ndarray:
    """Distinct occupied slots not read by this batch, sampled at random (up to SAMPLE * n)."""
    sample = np.unique(self._rng.integers(0, self.capacity, min(SAMPLE * n, 4 * self.capacity)))
    self._read[protect] = 1  # a mask, not np.isin: O(sample + hits), no sort
    sample = sample[(self.row_of[sample] >= 0) & (self._read[sample] == 0)]
    self._read[protect] = 0
    return sample

  def _pop_free(self, k: int) -> np.ndarray:
    self._nfree -= k
    return self._free[self._nfree:self._nfree + k].copy()

  def _place(self, rows: np.ndarray, slots: np.ndarray) -> None:
    self.slot_of[rows] = slots
    self.row_of[slots] = rows


def load_planner() -> Any:
  """The compiled planner (serving/engines/cached/plan.cc), or None when it was not built."""
  try:
    from serving.engines.cached import _plan
  except ImportError:
    return None
  return _plan
