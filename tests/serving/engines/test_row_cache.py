"""The cache index and policy without JAX (serving/engines/cached/row_cache.py), and table
placement under a budget (config.py): the index stays a bijection, a plan's sources point at
the right rows, LFU with aging tracks a shifting hot set, its hit rate is close to an oracle
that caches the truly most frequent rows, and placement follows budget and ratios. The policy
tests run against both implementations of `plan` (C++ plan.cc and numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from bundle import ParamSpec, TableLookup
from serving.engines.cached import EmbeddingCacheConfig, RowCache, parse_bytes, plan_tables
from serving.engines.cached.row_cache import load_planner

IMPLS = [pytest.param(True, id="cpp", marks=pytest.mark.skipif(
    load_planner() is None, reason="the C++ planner is not built (pip install -e .)")),
         pytest.param(False, id="numpy")]


def zipf(rng, alpha, n, size, perm):
  cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** alpha)
  return perm[np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)]


def check_index(c: RowCache) -> None:
  slots, rows = c.cached_rows()
  assert np.array_equal(c.slot_of[rows], slots)  # slot -> row -> the same slot
  assert (c.slot_of >= 0).sum() == len(slots) == c.occupancy <= c.capacity


def replay(c: RowCache, cache_rows: dict[int, int], rows: np.ndarray) -> np.ndarray:
  """What a batch reads: plan it, and resolve each source against the cache as it was
  (`cache_rows`, slot -> row) or the misses; then apply the inserts to `cache_rows`."""
  p = c.plan(rows)
  got = np.array([cache_rows[s] if s < c.capacity else p.miss_rows[s - c.capacity]
                  for s in p.src])
  for slot, k in zip(p.insert_slot, p.insert_from):
    cache_rows[int(slot)] = int(p.miss_rows[k])
  return got


@pytest.mark.parametrize("native", IMPLS)
def test_sources_resolve_to_the_rows_asked_for_and_the_index_stays_consistent(native):
  rng = np.random.default_rng(0)
  c = RowCache(1000, 50, seed=1, native=native)
  assert c.native == native
  cache_rows: dict[int, int] = {}
  perm = rng.permutation(1000)
  for i in range(200):
    rows = zipf(rng, 1.0, 1000, int(rng.integers(1, 300)), perm)
    np.testing.assert_array_equal(replay(c, cache_rows, rows), rows)
    check_index(c)
    if i % 50 == 49:
      assert c.invalidate(rows[:10]) <= 10
      check_index(c)
  assert c.stats.evictions > 0 and c.stats.hits > 0


@pytest.mark.parametrize("native", IMPLS)
def test_lfu_hit_rate_is_close_to_an_oracle_of_the_most_frequent_rows(native):
  rng = np.random.default_rng(1)
  n, cap = 100_000, 2_000
  perm = rng.permutation(n)
  c = RowCache(n, cap, seed=0, native=native)
  batches = [zipf(rng, 1.05, n, 512, perm) for _ in range(400)]
  for b in batches[:100]:  # warm the cache, then measure
    c.plan(b)
  hits0, lookups0 = c.stats.hits, c.stats.lookups
  for b in batches[100:]:
    c.plan(b)
  lfu = (c.stats.hits - hits0) / (c.stats.lookups - lookups0)
  rows, counts = np.unique(np.concatenate(batches), return_counts=True)
  oracle = np.sort(counts)[::-1][:cap].sum() / counts.sum()
  assert lfu >= 0.85 * oracle, (lfu, oracle)


@pytest.mark.parametrize("native", IMPLS)
def test_aging_lets_a_new_hot_set_replace_the_old_one(native):
  rng = np.random.default_rng(2)
  c = RowCache(10_000, 100, aging_lookups=4, seed=0, native=native)
  for rows in (np.arange(100), np.arange(5000, 5100)):
    for _ in range(60):
      c.plan(rng.choice(rows, 200))
  _, cached = c.cached_rows()
  assert (cached >= 5000).mean() > 0.9


@pytest.mark.parametrize("native", IMPLS)
def test_warm_fills_free_slots_hottest_first(native):
  c = RowCache(100, 3, native=native)
  assert c.warm(np.array([7, 7, 5, 999, 9, 11])) == 3
  assert sorted(c.cached_rows()[1]) == [5, 7, 9]
  assert c.plan(np.array([7, 5, 9])).miss_rows.size == 0


def lookup(rows, dtype="float32", dim=8):
  specs = [ParamSpec(f"tables/t{i:02d}", (r, dim), dtype, None) for i, r in enumerate(rows)]
  specs.append(ParamSpec("mlp/w", (4, 4), "float32", None))
  return TableLookup("sparse", "embeddings", tuple(range(len(rows))), tuple(rows), dim, dtype,
                     {}), specs


def test_a_budget_keeps_small_tables_on_device_and_caches_the_big_ones():
  lk, specs = lookup((1_000_000, 500_000, 1000, 10))  # 32 bytes per row
  plans = plan_tables(lk, specs, EmbeddingCacheConfig(device_budget_bytes=1 << 20,
                                                      min_device_table_bytes=0))
  assert [p.placement for p in plans] == ["cached", "cached", "device", "device"]
  assert sum(p.device_bytes for p in plans) <= 1 << 20
  assert plans[0].cache_rows == pytest.approx(2 * plans[1].cache_rows, rel=0.01)  # by size
  unlimited = plan_tables(lk, specs, EmbeddingCacheConfig())
  assert all(p.placement == "device" for p in unlimited)


def test_ratios_place_the_tables_they_name():
  lk, specs = lookup((1000, 1000, 1000))
  plans = plan_tables(lk, specs, EmbeddingCacheConfig(cache_ratios=(("tables/t00", 0.1),
                                                                    ("2", 1.0))))
  assert [p.cache_rows for p in plans] == [100, None, None]
  with pytest.raises(ValueError, match="no such table"):
    plan_tables(lk, specs, EmbeddingCacheConfig(cache_ratios=(("tables/nope", 0.1),)))


def test_config_from_json_and_sizes():
  cfg = EmbeddingCacheConfig.from_json({"device_budget": "1.5GiB", "cache_ratios": {"0": 0.2}})
  assert cfg.device_budget_bytes == 3 << 29 and cfg.cache_ratios == (("0", 0.2),) and cfg.enabled
  assert parse_bytes("512MiB") == 512 << 20 and parse_bytes(1000) == 1000
  for bad in ({"device_budget": "lots"}, {"host": "disk"}, {"cache_ratios": {"0": 0}},
              {"budget": 1}):
    with pytest.raises(ValueError):
      EmbeddingCacheConfig.from_json(bad)


@pytest.mark.parametrize("native", IMPLS)
def test_both_plans_count_alike_and_refuse_rows_out_of_range(native):
  rng = np.random.default_rng(3)
  c = RowCache(500, 20, seed=2, native=native)
  rows = rng.integers(0, 500, 300)
  p = c.plan(rows)
  uniq = np.unique(rows)
  assert c.stats.lookups == 300 and c.stats.unique == len(uniq) == len(p.miss_rows)
  assert c.stats.inserts == len(p.insert_slot) == 20 and c.stats.hits == 0
  assert np.array_equal(np.sort(p.miss_rows), uniq)
  np.testing.assert_array_equal(np.bincount(rows, minlength=500), c.freq)
  if native:
    with pytest.raises(ValueError, match="out of range"):
      c.plan(np.array([500]))
