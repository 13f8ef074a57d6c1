"""Bucket plans learned from traffic (serving/batching/bucket_plan.py) against brute force: every
set of k buckets from the observed sizes (the largest fixed) tried, the cheapest must match."""

import itertools
import random

import pytest

from serving.batching.bucket_plan import cost_model, evaluate, plan_buckets


def brute(counts, k, largest, cost):
  sizes = sorted(set(counts) | {largest})
  best = None
  for r in range(0, k):
    for combo in itertools.combinations(sizes[:-1], r):
      plan = evaluate(counts, [*combo, sizes[-1]], cost)
      if best is None or plan.expected_cost < best.expected_cost - 1e-12:
        best = plan
  return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_matches_brute_force(seed):
  rng = random.Random(seed)
  counts = {rng.randint(1, 60): rng.randint(1, 50) for _ in range(rng.randint(3, 9))}
  largest = max(counts) + rng.choice((0, 0, 17))
  cost = cost_model({1: 1e-4, 16: 2e-4, 64: 9e-4}) if seed % 2 else float
  for k in (1, 2, 3, 4):
    got = plan_buckets(counts, k, largest=largest, cost=cost)
    want = brute(counts, k, largest, cost)
    assert got.expected_cost == pytest.approx(want.expected_cost, rel=1e-12)
    assert got.buckets[-1] == largest and len(got.buckets) <= k


def test_padding_figures():
  counts = {3: 2, 5: 1, 8: 1}  # real rows 3+3+5+8 = 19 over 4 requests
  plan = evaluate(counts, [4, 8])
  assert plan.real == pytest.approx(19 / 4) and plan.padded == pytest.approx((4 + 4 + 8 + 8) / 4)
  assert plan.waste == pytest.approx(24 / 19 - 1)
  assert plan_buckets(counts, 3).buckets == (3, 5, 8) and plan_buckets(counts, 3).waste == 0
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    evaluate({9: 1}, [4, 8])


def test_cost_model_interpolates_measured_times():
  c = cost_model({1: 1.0, 5: 3.0})
  assert (c(1), c(3), c(5), c(10)) == (1.0, 2.0, 3.0, 6.0)
