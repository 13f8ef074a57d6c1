"""The embedding cache benchmark's own arithmetic (benchmarks/embedding_cache*.py), without a
server or JAX: the Zipf stream, its unique-id counts, the oracles, the Prometheus parsing, the
repository it writes and the requests it replays (a model name merged into a body)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.embedding_cache import (hit_rates, make_repository, model_name, parse_args,
                                        parse_cache_counters)
from benchmarks.embedding_cache_stream import (Stream, make_stream, oracle_hit_rates, unique_ids,
                                               zipf_ids)
from benchmarks.loadgen import build_request


def test_zipf_ids_follow_the_ranks_through_the_permutation():
  rng = np.random.default_rng(0)
  perm = np.random.default_rng(1).permutation(1000)
  ids = zipf_ids(rng, 1.2, perm, 200_000)
  counts = np.bincount(ids, minlength=1000)
  w = np.arange(1, 1001) ** -1.2
  expected = w / w.sum()  # rank k has probability k^-1.2 / H
  np.testing.assert_allclose(counts[perm[:5]] / len(ids), expected[:5], rtol=0.05)
  assert counts[perm[0]] == counts.max()
  assert ids.min() >= 0 and ids.max() < 1000


def test_zipf_ids_accept_alpha_below_one():
  ids = zipf_ids(np.random.default_rng(0), 0.8, np.arange(50), 10_000)
  counts = np.bincount(ids, minlength=50)
  assert counts[0] > counts[10] > counts[49] > 0


def test_unique_ids_by_hand():
  # one feature, windows of 2 rows: {0, 0} -> 1 id; {-1, 3} -> 1 id (-1 is no id); {5, 6} -> 2
  sparse = np.array([[[0], [0], [-1], [3], [5], [6]]])
  assert unique_ids(sparse, [0], 2) == pytest.approx(4 / 3)
  assert unique_ids(sparse, [0], 6) == 4  # {0, 3, 5, 6}


def test_oracles_by_hand():
  # feature 0 of a 1M-row table: lookups 7, 7, 7, 9, 9, 4 (-1 skipped); the Zipf's hottest
  # rows are 9 then 7; a 1-row cache: Zipf oracle holds 9 (2 of 6), stream oracle 7 (3 of 6)
  ids = np.array([7, 7, 7, 9, 9, 4, -1])
  hot = np.concatenate([[9, 7], np.setdiff1d(np.arange(1_000_000), [9, 7])])
  stream = Stream(1.0, ids.reshape(1, -1, 1), [], [hot], 0.0, 0.0)
  assert oracle_hit_rates(stream, {0: 1}) == (2 / 6, 3 / 6)
  assert oracle_hit_rates(stream, {0: 2}) == (5 / 6, 5 / 6)
  assert oracle_hit_rates(stream, {}) == (1.0, 1.0)
  assert stream.valid_per_request.tolist() == [6]


def test_hit_rates_take_padding_rows_out():
  # 100 ids sent, the server counted 120 lookups (20 padding rows) and 90 hits
  r = hit_rates(lookups=120, hits=90, sent=100)
  assert r["hit_rate"] == pytest.approx(70 / 100)
  assert r["server_hit_rate"] == pytest.approx(90 / 120)
  assert r["padding_lookups"] == pytest.approx(20 / 120)
  assert hit_rates(lookups=100, hits=80, sent=100)["hit_rate"] == pytest.approx(0.8)
  assert hit_rates(lookups=0, hits=0, sent=0)["hit_rate"] is None


def test_make_stream_shapes_missing_ids_and_stats():
  s = make_stream(1.05, requests=8, rows=64, missing=0.1, seed=0)
  assert s.sparse.shape == (8, 64, 8) and s.sparse.dtype == np.int64
  assert 0.05 < (s.sparse == -1).mean() < 0.15
  assert len(s.bodies) == 8
  assert 1 <= s.unique_per_request <= 64
  assert s.unique_per_request <= s.unique_per_batch <= 512
  again = make_stream(1.05, requests=8, rows=64, missing=0.1, seed=0)
  np.testing.assert_array_equal(s.sparse, again.sparse)  # a fixed stream
  assert np.array_equal(s.hot[0], make_stream(0.8, 1, 64, 0.0, 0).hot[0])  # same hot rows


def test_a_model_name_prefix_merges_into_a_body():
  """The replayed request: the model's name, serialized alone, then a body serialized without
  one: protobuf parses the concatenation as one message with both."""
  from serving.frontend.protocol import grpc_service_pb2 as pb

  inputs = {"dense": np.ones((2, 13), np.float32), "sparse": np.arange(16).reshape(2, 8)}
  merged = pb.ModelInferRequest.FromString(build_request("emb_r0200", {})
                                           + build_request("", inputs))
  assert merged == pb.ModelInferRequest.FromString(build_request("emb_r0200", inputs))


def test_parse_cache_counters_sums_tables_per_model():
  text = """# HELP xlaserve_embedding_lookups_total Ids looked up
# TYPE xlaserve_embedding_lookups_total counter
xlaserve_embedding_lookups_total{model="emb_r0200",table="tables/t00",version="1"} 100.0
xlaserve_embedding_lookups_total{model="emb_r0200",table="tables/t01",version="1"} 50.0
xlaserve_embedding_cache_hits_total{model="emb_r0200",table="tables/t00",version="1"} 90.0
xlaserve_embedding_cache_hits_total{model="emb_r0200",table="tables/t01",version="1"} 30.0
xlaserve_embedding_lookups_created{model="emb_r0200",table="tables/t00",version="1"} 1.7e9
xlaserve_embedding_cache_hit_ratio{model="emb_r0200",table="tables/t00",version="1"} 0.9
"""
  assert parse_cache_counters(text) == {"emb_r0200": (150.0, 120.0)}
  assert parse_cache_counters("xlaserve_requests_total 3\n") == {}


def test_parse_args_defaults_and_the_reference():
  args = parse_args(["--ratios", "0.05,0.2"])
  assert args.ratios == [1.0, 0.2, 0.05]  # the reference added, and measured first
  assert (args.duration, args.warmup, args.rounds) == (12.0, 4.0, 3)
  quick = parse_args(["--quick"])
  assert quick.duration < args.duration and quick.stream_requests < args.stream_requests
  assert quick.alphas == [0.8, 1.05, 1.2]


def test_make_repository_links_one_bundle_per_ratio(tmp_path):
  bundle = tmp_path / "bundle" / "m" / "1"
  bundle.mkdir(parents=True)
  (bundle / "manifest.json").write_text("{}")
  repo = make_repository(tmp_path, bundle, [1.0, 0.05])
  repo = make_repository(tmp_path, bundle, [1.0, 0.05])  # again: replaces the links
  for ratio in (1.0, 0.05):
    model = repo / model_name(ratio)
    assert (model / "1" / "manifest.json").exists()
    cfg = json.loads((model / "config.json").read_text())
    assert cfg == {"embedding_cache": {"cache_ratios": {"tables/t00": ratio,
                                                        "tables/t01": ratio}}}
  assert model_name(0.05) == "emb_r0050" and model_name(1.0) == "emb_r1000"
