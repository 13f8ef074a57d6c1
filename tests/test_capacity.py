"""Capacity planning (benchmarks/capacity.py): the batcher simulation against queueing theory
(an M/D/1 queue: Pollaczek-Khinchine's mean wait), the plan's arithmetic against hand-computed
replicas, and the check flagging a measured curve the simulation contradicts."""

import json

import numpy as np
import pytest

from benchmarks.capacity import curve_capacity, hourly_shape, parse_args, plan, run
from benchmarks.capacity_sim import Replica, simulate


def test_one_row_buckets_simulate_an_md1_queue():
  s, rate = 0.001, 500.0  # deterministic 1 ms service, utilization 0.5
  r = simulate(Replica({1: s}), rate=rate, rows=1, seconds=60.0, seed=3)
  rho = rate * s
  expected = s + rho * s / (2 * (1 - rho))  # Pollaczek-Khinchine: mean wait of M/D/1
  assert r.shed == 0 and abs(len(r.latencies_s) / 60.0 - rate) < 0.05 * rate
  assert r.latencies_s.mean() == pytest.approx(expected, rel=0.05)


def test_plan_arithmetic():
  w = hourly_shape(2.0)
  assert w.mean() == pytest.approx(1.0) and w.max() == pytest.approx(2.0) and np.argmax(w) == 16
  assert list(plan(np.array([0.0, 99.0, 100.0, 101.0]), 100.0)) == [1, 2, 2, 3]
  assert curve_capacity([[100, 5], [200, 15], [300, 40]], 10.0) == pytest.approx(150.0)
  assert curve_capacity([[100, 12]], 10.0) is None
  with pytest.raises(ValueError, match="24"):
    hourly_shape(2.0, [1.0] * 23)


def _profile(tmp_path, curve=None):
  prof = {"bucket_seconds": {"1": 2e-4, "8": 4e-4, "32": 1e-3, "128": 3.5e-3},
          "host_s_per_request": 5e-5, "instances": 1}
  if curve:
    prof.update(curve=curve, curve_rows=100)
  path = tmp_path / "p.json"
  path.write_text(json.dumps(prof))
  return path


def test_a_day_planned_and_checked(tmp_path):
  args = parse_args(["--profile", str(_profile(tmp_path)), "--requests-per-day", "1e8",
                     "--rows", "100", "--p99-ms", "20", "--sim-seconds", "5"])
  res = run(args)
  cap = res["capacity_rps"]
  # 100 rows fill a 128-row batch: at most one per 3.55 ms, about 280 requests/s per replica.
  assert 150 < cap < 282
  rates = 1e8 / 86400 * hourly_shape(1.7)
  assert res["replicas"] == [int(np.ceil(r / cap)) + 1 for r in rates]
  assert res["replica_hours_per_day"] == sum(res["replicas"])
  assert res["peak_check_p99_ms"] <= 20 and res["disagreements"] == []


def test_an_optimistic_curve_is_flagged(tmp_path):
  """A 'measured' curve claiming 3x what the replica can do: the plan follows it, the peak-hour
  simulation shows the target missed, and both disagreements are printed."""
  args = parse_args(["--profile", str(_profile(tmp_path, curve=[[300, 5], [900, 15]])),
                     "--requests-per-day", "1e8", "--rows", "100", "--p99-ms", "20",
                     "--sim-seconds", "5"])
  res = run(args)
  assert res["capacity_source"] == "curve" and res["capacity_rps"] == pytest.approx(900)
  assert res["peak_check_p99_ms"] > 20
  assert len(res["disagreements"]) == 2
