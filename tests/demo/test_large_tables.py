"""The large-table demo `dlrm_large` (demo/large_tables.py): its tables are skewed like real ads
models, its hot rows are the demo traffic's hottest ids, and served through the real server under
a device budget smaller than its tables (the embedding cache) it answers over gRPC as the same
bundle does with every table on the device; `xlaserve serve --demo` names unknown models clearly."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import tritonclient.grpc as tc

from bundle import read_manifest
from clientutil import infer, serving
from demo.large_tables import (HOT_ROWS_FILE, LARGE_TABLE_GIB, LargeTablesConfig,
                               build_dlrm_large, skewed_ids)
from demo.repository import BUILDERS, ON_REQUEST, demo_build, demo_builders
from procutil import run_cli

TINY = LargeTablesConfig.tiny()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> pathlib.Path:
  return build_dlrm_large(tmp_path_factory.mktemp("repo"), tiny=True)


def test_a_few_huge_tables_hold_most_bytes(bundle):
  lookup = read_manifest(bundle).signatures["serve"].table_lookup
  assert lookup.rows == TINY.table_sizes and len(lookup.rows) == 26
  nbytes = np.array(lookup.rows) * lookup.dim * 4  # float32
  assert list(nbytes) == sorted(nbytes, reverse=True)
  assert 3.9 * 2**20 < nbytes.sum() <= 4.1 * 2**20  # "a few MiB"
  assert nbytes[:3].sum() >= 0.85 * nbytes.sum()  # 3 huge tables
  assert nbytes[8:].sum() <= 0.01 * nbytes.sum()  # 18 small ones
  assert nbytes[2] > 4 * nbytes[3]  # the huge ones stand apart from the medium ones


def test_the_default_size_is_4_gib_with_tens_of_millions_of_rows():
  config = LargeTablesConfig.demo()
  sizes = np.array(config.table_sizes)
  assert abs(sizes.sum() * config.row_bytes / 2**30 - LARGE_TABLE_GIB) < 0.01
  assert sizes[0] > 20_000_000 and sizes[2] > 10_000_000 and sizes[-1] < 100
  assert LargeTablesConfig.demo(1.0).table_bytes == 2**30
  with pytest.raises(ValueError, match="table_gib"):
    LargeTablesConfig.demo(0)


def test_hot_rows_are_the_hottest_ids_of_the_demo_traffic(bundle):
  from serving.engines.cached import engine

  assert HOT_ROWS_FILE == engine.HOT_ROWS_FILE
  hot = np.load(bundle / HOT_ROWS_FILE)
  assert sorted(hot.files) == [f"tables/t{f:02d}" for f in range(8)]  # huge and medium
  ids = skewed_ids(np.random.default_rng(0), TINY.table_sizes, 20_000)
  assert 0.01 < (ids == -1).mean() < 0.03
  for f in range(3):
    rows, col = hot[f"tables/t{f:02d}"], ids[:, f][ids[:, f] >= 0]
    assert len(np.unique(rows)) == len(rows) and rows.max() < TINY.table_sizes[f]
    values, counts = np.unique(col, return_counts=True)
    np.testing.assert_array_equal(values[np.argsort(-counts)[:3]], rows[:3])
    assert np.isin(col, rows).mean() > 0.8  # a 1/16 of the rows takes most lookups


def _bucketed(engine, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
  """`prob` of every row from an engine called directly, in chunks padded to its buckets."""
  out = []
  for start in range(0, len(dense), engine.buckets[-1]):
    d, s = dense[start:start + engine.buckets[-1]], sparse[start:start + engine.buckets[-1]]
    b = min(b for b in engine.buckets if b >= len(d))
    pad = lambda a: np.concatenate([a, np.zeros((b - len(a), *a.shape[1:]), a.dtype)])  # noqa: E731
    res = engine.fetch(engine.dispatch(bucket=b, inputs={"dense": pad(d), "sparse": pad(s)}))
    out.append(res["prob"][:len(d)])
  return np.concatenate(out)


def test_served_under_a_small_budget_equals_every_table_on_device(bundle):
  from serving.engines import BundleEngine
  from serving.engines.cached import CachedTablesEngine

  repo = bundle.parent.parent
  # 512 KiB of 4 MiB: the small and medium tables fit, the 3 huge ones get ~3% of their rows.
  (repo / "dlrm_large" / "config.json").write_text(json.dumps(
      {"embedding_cache": {"device_budget": "512KiB", "min_device_table_bytes": "16KiB"}}))
  full = BundleEngine(bundle)
  full.warmup()
  rng = np.random.default_rng(7)
  try:
    with serving(repo) as bg, tc.InferenceServerClient(bg.address) as client:
      engine = bg.server.repository.get("dlrm_large").runner.engine
      assert isinstance(engine, CachedTablesEngine)
      assert [p.feature for p in engine.plans if p.cache_rows is not None] == [0, 1, 2]
      assert sum(p.device_bytes for p in engine.plans) <= 512 << 10
      for n in (1, 7, 64, 150):  # 150: above the largest bucket, split across batches
        dense = rng.normal(size=(n, 13)).astype(np.float32)
        sparse = skewed_ids(rng, TINY.table_sizes, n, missing=0.1)
        sparse[0, :3] = -1  # a missing id in every cached table
        got = infer(client, "dlrm_large", {"dense": dense, "sparse": sparse}, ["prob"])["prob"]
        np.testing.assert_allclose(got, _bucketed(full, dense, sparse), rtol=1e-6, atol=1e-6,
                                   err_msg=f"{n} rows")
      stats = [s for s in engine.table_stats() if s["placement"] == "cached"]
      assert all(s["hits"] > 0 and s["misses"] > 0 for s in stats), stats
  finally:
    full.close()


def test_dlrm_large_is_served_only_on_request(tmp_path):
  assert "dlrm_large" in ON_REQUEST and "dlrm_large" not in BUILDERS
  assert list(demo_builders()) == list(BUILDERS)
  assert list(demo_builders(["dlrm_large", "dlrm"])) == ["dlrm", "dlrm_large"]
  with pytest.raises(ValueError, match="unknown demo model.*nosuch.*choose from.*dlrm_large"):
    demo_builders(["dlrm", "nosuch"])
  repo = lambda **kw: demo_build(lambda msg: None, root=tmp_path, **kw).repo  # noqa: E731
  assert repo() == repo(models=list(BUILDERS))  # the standard set keeps its folder
  assert len({repo(), repo(models=["dlrm"]), repo(models=["dlrm_large"]),
              repo(models=["dlrm_large"], table_gib=1.0)}) == 4  # table size in the key


def test_cli_table_size_default_matches_the_demo():
  from serving.cli_flags import build_parser

  args = build_parser().parse_args(["serve", "--demo", "dlrm_large"])
  assert args.demo_table_gib == LARGE_TABLE_GIB and args.demo == "dlrm_large"


def test_serve_with_an_unknown_demo_model_says_which_exist():
  p = run_cli("--demo", "dlrm,nosuch", "--grpc-port", "0", "--http-port", "-1")
  assert p.returncode == 2, p.stdout + p.stderr
  assert "unknown demo model(s) nosuch" in p.stderr and "dlrm_large" in p.stderr, p.stderr
  assert "ctr_light" in p.stderr and "listening" not in p.stdout
