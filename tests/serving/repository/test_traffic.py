"""Canary routing decisions and the shadow comparison, without a server: config validation, weights
within binomial bounds, stickiness, minimal movement on a weight change, and the comparison
against scipy/numpy on the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from serving.repository import ModelServingConfig
from serving.repository.traffic import (ShadowConfig, TrafficConfig, pick, sticky_point,
                                        unloaded_versions)
from serving.telemetry.shadow_compare import ScoreComparison


def split(**versions: float) -> tuple[tuple[int, float], ...]:
  return tuple(sorted((int(k[1:]), w) for k, w in versions.items()))


def test_config_reads_traffic_and_shadow():
  cfg = ModelServingConfig.from_json({
      "version_policy": "all",
      "traffic": {"versions": {"1": 90, "2": 10}, "sticky_parameter": "user_id"},
      "shadow": {"version": 3, "fraction": 0.25, "queue_requests": 8, "output": "y"}})
  assert cfg.traffic == TrafficConfig(((1, 90), (2, 10)), "user_id")
  assert cfg.shadow == ShadowConfig(3, 0.25, 8, "y")
  assert ModelServingConfig.from_json({}).traffic is None


@pytest.mark.parametrize("doc,message", [
    ({"traffic": {"versions": {"1": -1, "2": 10}}}, "weight of version 1 must be a finite"),
    ({"traffic": {"versions": {"1": 0}}}, "must not all be 0"),
    ({"traffic": {"versions": {}}}, "at least one version"),
    ({"traffic": {"versions": {"one": 1}}}, "version 'one' must be an integer >= 1"),
    ({"traffic": {"versions": {"1": "x"}}}, "weight of version 1"),
    ({"traffic": {"versions": [1, 2]}}, "must be an object of version -> weight"),
    ({"traffic": {"versions": {"1": 1}, "sticky": "u"}}, "unknown keys ['sticky']"),
    ({"traffic": {"versions": {"1": 1}, "sticky_parameter": ""}}, "sticky_parameter must be"),
    ({"shadow": {"version": 2, "fraction": 1.5}}, "fraction must be in [0, 1]"),
    ({"shadow": {"version": 2, "fraction": -0.1}}, "fraction must be in [0, 1]"),
    ({"shadow": {"fraction": 0.1}}, "shadow.version is required"),
    ({"shadow": {"version": 0}}, "must be an integer >= 1"),
    ({"shadow": {"version": 2, "queue_requests": 0}}, "queue_requests must be an integer >= 1"),
    ({"traffic": {"versions": {"1": 1, "2": 1}}, "shadow": {"version": 2}},
     "shadow.version 2 is also in traffic.versions"),
    ({"version_policy": "specific", "versions": [1, 2], "traffic": {"versions": {"1": 1, "3": 1}}},
     "name versions [3] that the version policy does not load"),
])
def test_bad_configs_are_refused_with_the_reason(doc, message):
  with pytest.raises(ValueError) as e:
    ModelServingConfig.from_json(doc)
  assert message in str(e.value)


def test_unloaded_versions_names_them():
  t = TrafficConfig(((1, 1.0), (2, 1.0)))
  assert unloaded_versions(t, ShadowConfig(3), [1, 2, 3]) is None
  assert "[3]" in unloaded_versions(t, ShadowConfig(3), [1, 2])


def test_weights_within_binomial_bounds_and_renormalised():
  rng = np.random.default_rng(0)
  keys = [f"user-{k}" for k in rng.integers(0, 1 << 62, size=20000)]
  weights = split(v1=80, v2=20)
  got = [pick(weights, {1, 2}, sticky_point(k)) for k in keys]
  n, share = len(got), 0.2
  assert abs(got.count(2) - n * share) <= 4 * np.sqrt(n * share * (1 - share))
  # Version 2 not ready: everything goes to version 1; none ready: None.
  assert {pick(weights, {1}, sticky_point(k)) for k in keys[:500]} == {1}
  assert pick(weights, set(), 0.5) is None
  # Three versions, one not ready: the other two share by their weights (1:3).
  three = split(v1=1, v2=5, v3=3)
  got = [pick(three, {1, 3}, u) for u in rng.random(20000)]
  assert abs(got.count(3) - 15000) <= 4 * np.sqrt(20000 * 0.75 * 0.25)


def test_sticky_keys_stay_and_weight_changes_move_only_the_shifted_users():
  keys = [f"u{i}" for i in range(5000)]
  before = {k: pick(split(v1=90, v2=10), {1, 2}, sticky_point(k)) for k in keys}
  again = {k: pick(split(v1=90, v2=10), {1, 2}, sticky_point(k)) for k in keys}
  assert before == again
  after = {k: pick(split(v1=80, v2=20), {1, 2}, sticky_point(k)) for k in keys}
  moved = [k for k in keys if before[k] != after[k]]
  assert all(before[k] == 1 and after[k] == 2 for k in moved)  # nobody leaves version 2
  assert abs(len(moved) - 500) <= 4 * np.sqrt(5000 * 0.1 * 0.9)
  # Not Python's salted hash: the same points in every process and release (golden values;
  # changing them would move users between versions on upgrade). The native front end computes
  # the same points (test_canary.py checks both paths agree).
  assert [sticky_point(k) for k in ("user-42", "", "u\u00e9")] == [
      0.638995336291391, 0.93676944839044, 0.40962917585812875]


def offline(primary: list[np.ndarray], shadow: list[np.ndarray]) -> dict:
  """The comparison computed in one go with numpy/scipy over every row."""
  p, s = np.concatenate(primary), np.concatenate(shadow)
  ranked = [(a, b) for a, b in zip(primary, shadow) if len(a) > 1]
  q = [0.5, 0.9, 0.99]
  return {"mean_primary": p.mean(), "mean_shadow": s.mean(), "mean_shift": s.mean() - p.mean(),
          "calibration_ratio": s.mean() / p.mean(), "spearman": scipy.stats.spearmanr(p, s)[0],
          "top_changed_share": np.mean([np.argmax(a) != np.argmax(b) for a, b in ranked]),
          "qp": np.quantile(p, q), "qs": np.quantile(s, q), "rows": len(p)}


def assert_report_matches(r: dict, want: dict) -> None:
  for k in ("mean_primary", "mean_shadow", "mean_shift", "calibration_ratio", "spearman",
            "top_changed_share"):
    assert r[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k
  got_qp = [r["quantiles"][f"p{p}"]["primary"] for p in (50, 90, 99)]
  got_qs = [r["quantiles"][f"p{p}"]["shadow"] for p in (50, 90, 99)]
  np.testing.assert_allclose(got_qp, want["qp"], rtol=1e-12)
  np.testing.assert_allclose(got_qs, want["qs"], rtol=1e-12)
  assert r["rows"] == want["rows"]


def test_comparison_equals_numpy_on_the_same_rows():
  rng = np.random.default_rng(1)
  primary, shadow = [], []
  cmp = ScoreComparison(reservoir_rows=4096)
  for _ in range(300):
    n = int(rng.integers(1, 9))
    p = rng.integers(0, 20, n) / 4.0  # ties: rank averaging matters
    s = 0.7 * p + rng.normal(0, 1, n)
    primary.append(p)
    shadow.append(s)
    cmp.add(p, s)
  r = cmp.report()
  assert r["exact_quantiles"] and r["requests"] == 300
  assert_report_matches(r, offline(primary, shadow))


def test_reservoir_is_a_uniform_sample_past_its_size():
  rng = np.random.default_rng(2)
  cmp = ScoreComparison(reservoir_rows=2000, seed=3)
  p = rng.random(40000)
  for chunk in np.array_split(p, 4000):
    cmp.add(chunk, chunk * 2)
  r = cmp.report()
  assert not r["exact_quantiles"] and r["reservoir_rows"] == 2000 and r["rows"] == 40000
  assert r["mean_primary"] == pytest.approx(p.mean(), rel=1e-12)  # means stay exact
  for q, name in ((0.5, "p50"), (0.9, "p90")):  # rank error about sqrt(q(1-q)/n)
    tol = 4 * np.sqrt(q * (1 - q) / 2000)
    got = r["quantiles"][name]["primary"]
    assert abs(np.mean(p <= got) - q) <= tol, name
  assert r["spearman"] == pytest.approx(1.0)


def test_empty_and_degenerate_comparisons_say_none():
  cmp = ScoreComparison()
  assert cmp.report()["mean_shift"] is None
  cmp.add(np.array([1.0]), np.array([2.0]))
  r = cmp.report()
  assert r["spearman"] is None and r["top_changed_share"] is None
  assert r["calibration_ratio"] == 2.0
  with pytest.raises(ValueError, match="not the same rows"):
    cmp.add(np.ones(2), np.ones(3))
