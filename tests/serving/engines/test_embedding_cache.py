"""The embedding cache engine against the same bundle with every table on the device: outputs
bit-identical for any cache size (one row, small, large), Zipf skews, eviction storms, a cache
that always misses, 8-bit tables, missing (-1), hashed and 64-bit ids, and two dispatch
threads; the bundle's own serve artifact agrees too."""

from __future__ import annotations

import concurrent.futures
import dataclasses
from contextlib import closing

import numpy as np
import pytest
from flax import nnx

import export
from models.dlrm import DLRM, DLRMConfig
from serving.engines import BundleEngine
from serving.engines.cached import CachedTablesEngine, EmbeddingCacheConfig

TABLES = (5000, 3000, 64, 32)
BUCKETS = (1, 8, 64)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  cfg = dataclasses.replace(DLRMConfig.tiny(), table_sizes=TABLES, embedding_impl="xla")
  model = DLRM(cfg, rngs=nnx.Rngs(0))
  out = {}
  for quant in ("none", "int8_tables"):
    path = export.export_model(
        model, repository=repo, name=f"d_{quant}",
        inputs=[export.Input("dense", "float32", ("batch", 13)),
                export.Input("sparse", "int64", ("batch", len(TABLES)))],
        config=export.ExportConfig(batch_buckets=BUCKETS, quantization=quant))
    full = CachedTablesEngine(path, config=EmbeddingCacheConfig())  # every table on device
    full.warmup()
    out[quant] = (path, full)
  yield out
  for _, full in out.values():
    full.close()


def cached(path, **kw) -> CachedTablesEngine:
  eng = CachedTablesEngine(path, config=EmbeddingCacheConfig(min_device_table_bytes=0, **kw))
  eng.warmup()
  return eng


def zipf_ranks(rng, alpha: float, n: int, size: int) -> np.ndarray:
  """Ranks in [0, n) with P(k) proportional to 1 / (k + 1) ** alpha."""
  cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** alpha)
  return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1]), n - 1)


def stream(seed: int, n: int, alpha: float | None, id_max: int = 2**31 - 1):
  """(bucket, inputs) batches: Zipf ids (alpha) or uniform ones (None) with 10% missing,
  some hashed past the table size."""
  rng = np.random.default_rng(seed)
  perm = [rng.permutation(r) for r in TABLES]
  for i in range(n):
    b = BUCKETS[i % len(BUCKETS)]
    if alpha is None:
      ids = rng.integers(0, 10**6, size=(b, len(TABLES)))
    else:  # bounded Zipf over each table's rows (any alpha > 0), hot rows scattered
      ids = np.stack([perm[f][zipf_ranks(rng, alpha, TABLES[f], b)] for f in range(len(TABLES))],
                     axis=1)
    ids = ids + rng.integers(0, 3, size=ids.shape) * np.array(TABLES)  # hashed modulo rows
    ids = np.minimum(ids, id_max).astype(np.int64)
    ids[rng.random(ids.shape) < 0.1] = -1
    yield b, {"dense": rng.normal(size=(b, 13)).astype(np.float32), "sparse": ids}


def run(engine, bucket, inputs):
  return engine.fetch(engine.dispatch(bucket=bucket, inputs=inputs))["prob"]


def assert_same(full, engine, batches) -> None:
  for i, (b, ins) in enumerate(batches):
    np.testing.assert_array_equal(run(engine, b, ins), run(full, b, ins), err_msg=f"batch {i}")


@pytest.mark.parametrize("quant", ["none", "int8_tables"])
@pytest.mark.parametrize("alpha", [0.8, 1.2])
@pytest.mark.parametrize("ratio", [0.0002, 0.02, 0.5])
def test_outputs_bit_identical_to_every_table_on_device(bundles, quant, alpha, ratio):
  path, full = bundles[quant]
  with closing(cached(path, cache_ratios=(("tables/t00" if quant == "none" else "tables/t00/codes",
                                    ratio), ("1", ratio)))) as eng:
    assert [p.placement for p in eng.plans] == ["cached", "cached", "device", "device"]
    assert eng.plans[0].cache_rows == max(1, int(TABLES[0] * ratio))
    batches = list(stream(int(alpha * 10), 30, alpha))
    assert_same(full, eng, batches)
    st = {t["feature"]: t for t in eng.table_stats()}
    ids = np.concatenate([ins["sparse"][:, 0] for _, ins in batches])
    assert st[0]["lookups"] == (ids >= 0).sum()
    assert st[0]["hits"] + st[0]["misses"] <= st[0]["lookups"]
    seen = len(np.unique(ids[ids >= 0] % TABLES[0]))  # a free slot takes every miss
    assert st[0]["occupancy"] == min(eng.plans[0].cache_rows, seen)


def test_eviction_storm_and_one_row_cache(bundles):
  path, full = bundles["none"]
  with closing(cached(path, cache_ratios=(("0", 0.0002), ("1", 0.001)))) as eng:  # 1, 3 rows
    assert_same(full, eng, stream(5, 30, None))  # uniform ids: nothing stays hot
    st = {t["feature"]: t for t in eng.table_stats()}
    assert st[1]["evictions"] > 0 and st[0]["occupancy"] == 1


def test_a_cache_that_always_misses(bundles):
  path, full = bundles["int8_tables"]
  with closing(cached(path, cache_ratios=(("0", 0.1),))) as eng:
    rng = np.random.default_rng(3)
    batches, start = [], 0
    for b in (64, 8, 64, 1, 64):  # every id new: rows start, start+1, ... never repeat
      ids = np.stack([np.arange(start, start + b)] * len(TABLES), axis=1).astype(np.int64)
      start += b
      batches.append((b, {"dense": rng.normal(size=(b, 13)).astype(np.float32), "sparse": ids}))
    assert_same(full, eng, batches)
    (st,) = [t for t in eng.table_stats() if t["feature"] == 0]
    assert st["hits"] == 0 and st["misses"] == st["lookups"] == start


def test_64_bit_ids_are_hashed_modulo_rows_exactly(bundles):
  path, full = bundles["none"]
  with closing(cached(path, cache_ratios=(("0", 0.05),))) as eng:
    b = 8
    ids = np.full((b, len(TABLES)), 2**40 + 7, np.int64) + np.arange(b)[:, None]
    small = ids % np.array(TABLES)  # the same rows, as small ids
    dense = np.ones((b, 13), np.float32)
    got = run(eng, b, {"dense": dense, "sparse": ids})
    np.testing.assert_array_equal(got, run(full, b, {"dense": dense, "sparse": small}))


def test_two_threads_dispatching_at_once_stay_exact(bundles):
  path, full = bundles["none"]
  with closing(cached(path, cache_ratios=(("0", 0.01), ("1", 0.01)))) as eng:
    batches = list(stream(11, 60, 1.05))
    want = [run(full, b, ins) for b, ins in batches]

    def worker(k):
      return [(i, run(eng, *batches[i])) for i in range(k, len(batches), 2)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      for part in pool.map(worker, (0, 1)):
        for i, got in part:
          np.testing.assert_array_equal(got, want[i], err_msg=f"batch {i}")


def test_the_bundles_own_artifact_agrees(bundles):
  path, full = bundles["none"]
  with closing(BundleEngine(path)) as plain:
    plain.warmup()
    for b, ins in stream(2, 6, 1.05):
      np.testing.assert_allclose(run(full, b, ins), run(plain, b, ins), rtol=1e-6, atol=1e-7)


def test_a_bundle_without_table_lookup_is_refused_with_advice(tmp_path):
  from bundle import BundleError
  from servingutil import write_mock_bundle

  write_mock_bundle(tmp_path, "mock", 1)
  with pytest.raises(BundleError, match="from-embeddings artifact"):
    CachedTablesEngine(tmp_path / "mock" / "1", config=EmbeddingCacheConfig(device_budget_bytes=1))


def test_live_updates_match_the_all_on_device_model_updated_alike(bundles):
  path, _ = bundles["none"]
  # `full` is its own copy: updates below must not leak into the shared reference.
  with closing(cached(path)) as full, closing(
      cached(path, cache_ratios=(("0", 0.02), ("1", 0.02)))) as eng:
    rng = np.random.default_rng(8)
    batches = list(stream(21, 24, 1.05))
    for i, (b, ins) in enumerate(batches):
      assert_same(full, eng, [(b, ins)])
      if i % 3 == 2:  # new values for hot and cold ids of cached, device and dense leaves
        hot = ins["sparse"][:, 0][ins["sparse"][:, 0] >= 0][:4]
        ids = np.concatenate([hot, rng.integers(0, 10**9, 3)])
        change = {"tables/t00": (ids, rng.normal(size=(len(ids), 8)).astype(np.float32)),
                  "tables/t02": (np.array([1, 70]), rng.normal(size=(2, 8)).astype(np.float32))}
        if i == 8:
          w = next(p for p in eng.manifest.params if p.path.startswith("bottom"))
          change[w.path] = (np.array([0]), rng.normal(size=(1, *w.shape[1:])).astype(np.float32))
        assert eng.apply_update(change) == full.apply_update(change) == i // 3 + 1
    h = eng.dispatch(bucket=1, inputs={"dense": np.zeros((1, 13), np.float32),
                                       "sparse": np.zeros((1, 4), np.int64)})
    assert eng.generation_of(h) == 8
    (st,) = [t for t in eng.table_stats() if t["feature"] == 0]
    assert st["updated_rows"] == 8 * 7 and st["invalidations"] > 0


def test_a_bad_update_changes_nothing(bundles):
  path, full = bundles["none"]
  with closing(cached(path, cache_ratios=(("0", 0.02),))) as eng:
    b, ins = next(stream(4, 1, 1.05))
    before = run(eng, b, ins)
    good = (np.array([1, 2]), np.ones((2, 8), np.float32))
    for bad, match in (({"tables/t00": good, "nope": good}, "no param leaf"),
                       ({"tables/t00": good, "tables/t01": (np.array([-1]), np.ones((1, 8)))},
                        "non-negative"),
                       ({"tables/t00": (np.array([1]), np.ones((1, 3)))}, "shape")):
      with pytest.raises(ValueError, match=match):
        eng.apply_update(bad)
    assert eng.generation == 0
    np.testing.assert_array_equal(run(eng, b, ins), before)


def test_memory_mapped_host_tables_serve_and_update_without_touching_disk(bundles):
  path, full = bundles["int8_tables"]
  with closing(cached(path, cache_ratios=(("0", 0.02), ("1", 0.02)), host="mmap")) as eng:
    raw = sorted((path / "host_tables").glob("*.npy"))
    assert len(raw) == 6  # codes, scale and offset of both cached tables
    on_disk = {f.name: np.load(f) for f in raw}
    assert_same(full, eng, stream(13, 12, 1.05))
    ids = np.array([3, 4])
    change = {"tables/t00/codes": (ids, np.full((2, 8), 7, np.int8))}
    eng.apply_update(change)
    with closing(cached(path)) as own:  # every table on device, updated alike
      own.apply_update(change)
      assert_same(own, eng, stream(14, 6, 1.05))
    for f in raw:  # copy-on-write: updates never reach the raw copies
      np.testing.assert_array_equal(np.load(f), on_disk[f.name])
