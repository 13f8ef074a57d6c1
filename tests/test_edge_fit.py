"""The edge of a load test from repeated pass/fail verdicts (benchmarks/edge_fit.py) and the
interleaved-trials summary built on it (benchmarks/slo_trials.py), on synthetic verdicts drawn
from a known curve: the fit must find the curve's own 50% point."""

import numpy as np
import pytest

from benchmarks.edge_fit import bootstrap_gap, fit_edge
from benchmarks.slo_trials import (cpu_ceiling, grid, median_p99s, summarize, valid_counts,
                                   widened)


def draws(center: float, width: float, loads, per_load: int, seed: int):
  """Verdicts at each load, VALID with probability 1 / (1 + exp((load - center) / width))."""
  rng = np.random.default_rng(seed)
  q = np.repeat(np.asarray(loads, dtype=float), per_load)
  return q, rng.random(q.size) < 1.0 / (1.0 + np.exp((q - center) / width))


@pytest.mark.parametrize("center,width", [(30_000, 1_500), (42_000, 800), (6_500, 300)])
def test_the_fit_finds_the_load_valid_half_the_time(center, width):
  loads = np.linspace(0.8 * center, 1.2 * center, 7)
  q, ok = draws(center, width, loads, 60, seed=int(center))
  edge = fit_edge(q, ok)
  assert edge.status == "fit"
  assert abs(edge.qps - center) / center < 0.03


def test_a_clean_cut_puts_the_edge_between_the_last_pass_and_the_first_fail():
  q = [30_000] * 4 + [34_000] * 4 + [38_000] * 4 + [42_000] * 4
  ok = [True] * 8 + [False] * 8
  edge = fit_edge(q, ok)
  assert 34_000 <= edge.qps <= 38_000


def test_no_turn_in_the_verdicts_gives_a_bound_not_a_fit():
  assert fit_edge([10, 20, 30], [True, True, True]).status == "all_valid"
  assert fit_edge([10, 20, 30], [True, True, True]).qps == 30
  none = fit_edge([10, 20, 30], [False, False, False])
  assert (none.status, none.qps) == ("none_valid", 0.0)
  assert fit_edge([], []).qps == 0.0


def test_the_bootstrap_is_sure_of_a_real_gap_and_unsure_of_none():
  loads = np.linspace(32_000, 44_000, 5)
  qa, oka = draws(36_000, 700, loads, 8, seed=1)
  qb, okb = draws(40_000, 700, loads, 8, seed=2)
  a, b = list(zip(qa, oka)), list(zip(qb, okb))
  apart = bootstrap_gap(a, b, draws=100)
  assert apart["share_b_higher"] >= 0.9
  assert 2_000 < apart["gap"] < 6_000
  assert apart["p10"] <= apart["gap"] <= apart["p90"]
  same = bootstrap_gap(a, a, draws=100)
  assert same["gap"] == 0
  assert same["p10"] <= 0 <= same["p90"]


def test_the_grid_spans_both_edges_or_the_one_found():
  both = grid({"fixed": 30_000, "slo": 40_000}, 5)
  assert len(both) == 5 and both[0] < 30_000 and both[-1] > 40_000
  assert all(x < y for x, y in zip(both, both[1:]))
  one = grid({"fixed": 0, "slo": 20_000}, 3)
  assert one[0] < 20_000 < one[-1]
  assert grid({"fixed": 0, "slo": 0}, 5) == []


def test_the_summary_divides_each_edge_by_the_rounds_median_saturation():
  loads = [30_000, 34_000, 38_000, 42_000]

  def runs(last_valid):
    return [{"target_qps": q, "valid": q <= last_valid, "p99_ms": q / 1e3 + t, "trial": t}
            for t in range(3) for q in loads]

  trials = {"fixed": {"saturation": [50_000, 40_000, 44_000], "runs": runs(34_000)},
            "slo": {"saturation": [48_000, 46_000, 30_000], "runs": runs(38_000)}}
  s = summarize(trials)
  assert s["saturation"] == 46_000  # the rounds' best: 50k, 46k, 44k
  assert 34_000 <= s["fixed"]["edge_qps"] <= 38_000
  assert 38_000 <= s["slo"]["edge_qps"] <= 42_000
  assert s["slo"]["ratio"] == pytest.approx(s["slo"]["edge_qps"] / 46_000)
  assert s["gap"]["share_b_higher"] == 1.0
  assert valid_counts(trials["fixed"]["runs"]) == "30.0k 3/3, 34.0k 3/3, 38.0k 0/3, 42.0k 0/3"
  assert median_p99s(trials["fixed"]["runs"]) == "31, 35, 39, 43"  # trials add 0, 1, 2 ms


def test_an_edge_outside_the_loads_tried_is_marked_as_such():
  loads = [30_000, 34_000, 38_000]
  inside = [{"target_qps": q, "valid": q <= 34_000, "p99_ms": 1.0, "trial": t}
            for t in range(4) for q in loads]
  beyond = [{"target_qps": q, "valid": t != 0, "p99_ms": 1.0, "trial": t}  # 3/4 at every load
            for t in range(4) for q in loads]
  s = summarize({"fixed": {"saturation": [50_000] * 4, "runs": inside},
                 "slo": {"saturation": [50_000] * 4, "runs": beyond}})
  assert s["fixed"]["edge_status"] == "fit"
  assert s["slo"]["edge_status"] == "extrapolated"
  assert s["slo"]["edge_qps"] > 38_000


def test_the_grid_grows_toward_an_edge_it_does_not_yet_hold():
  loads = [30_000.0, 32_000.0, 34_000.0]

  def runs(valid_at):
    return [{"target_qps": q, "valid": valid_at(q)} for q in loads for _ in range(2)]

  held = {"fixed": runs(lambda q: q <= 32_000), "slo": runs(lambda q: q <= 32_000)}
  assert widened(loads, held) == loads  # both edges inside: nothing to add
  higher = {"fixed": runs(lambda q: q <= 32_000), "slo": runs(lambda q: True)}
  assert widened(loads, higher) == loads + [36_000.0]
  lower = {"fixed": runs(lambda q: False), "slo": runs(lambda q: q <= 32_000)}
  assert widened(loads, lower) == [28_000.0] + loads


def test_the_cpu_ceiling_is_the_cores_over_the_cost_near_the_edge():
  """2 cores at 50 us a query near a 30k edge carry 40k; runs far from the edge (cheaper per
  query: larger batches) and runs without CPU figures do not count."""
  runs = [{"target_qps": 30_000, "cpu_us": 50.0}, {"target_qps": 31_000, "cpu_us": 48.0},
          {"target_qps": 29_000, "cpu_us": 52.0}, {"target_qps": 45_000, "cpu_us": 30.0},
          {"target_qps": 30_500, "cpu_us": float("nan")}]
  assert cpu_ceiling(runs, 30_000, cores=2) == pytest.approx(2e6 / 50.0)
  assert cpu_ceiling(runs, 45_000, cores=4) == pytest.approx(4e6 / 30.0)
  assert np.isnan(cpu_ceiling([{"target_qps": 1.0, "cpu_us": float("nan")}], 1.0, cores=2))
  trials = {b: {"saturation": [50_000, 50_000],
                "runs": [{"target_qps": q, "valid": q <= 30_000, "p99_ms": 1.0, "trial": t,
                          "cpu_us": 50.0} for t in range(2) for q in (28_000, 30_000, 32_000)]}
            for b in ("fixed", "slo")}
  assert summarize(trials, cores=2)["slo"]["ceiling"] == pytest.approx(40_000 / 50_000)
