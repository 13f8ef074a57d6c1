"""Bucket plans learned from traffic, in plain Python: given how often each size (rows of a
request, or a sequence length) occurs and what a batch of each size costs, the set of K buckets
that minimises the expected padded cost (exact, by dynamic programming over the observed sizes).

Every size must fit, so the largest bucket is at least the largest size seen (and is kept at the
current largest bucket when one is given: it sets the throughput under load). The cost of a
bucket is its measured batch time when known (interpolated between measured buckets), else its
row count: then the plan minimises padded rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  buckets: tuple[int, ...]
  expected_cost: float  # per request, in the cost's unit
  real: float  # real rows (or tokens) per request
  padded: float  # padded rows per request

  @property
  def waste(self) -> float:
    """Padded / real work, less one: the share of the work that is padding."""
    return self.padded / self.real - 1.0 if self.real else 0.0


def cost_model(seconds: Mapping[int, float]) -> Callable[[int], float]:
  """Batch time of any size: linear between measured buckets, proportional beyond them."""
  pts = sorted(seconds.items())
  xs = [b for b, _ in pts]

  def cost(n: int) -> float:
    i = bisect.bisect_left(xs, n)
    if i < len(xs) and xs[i] == n:
      return pts[i][1]
    if i == 0:
      return pts[0][1]
    if i == len(xs):
      return pts[-1][1] * n / xs[-1]
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
  return cost


def evaluate(counts: Mapping[int, float], buckets: Sequence[int],
             cost: Callable[[int], float] = float) -> BucketPlan:
  """The expected cost, real and padded rows per request of serving `counts` with `buckets`."""
  buckets = sorted(buckets)
  total = sum(counts.values())
  if not total:
    raise ValueError("no traffic recorded")
  if max(counts) > buckets[-1]:
    raise ValueError(f"size {max(counts)} exceeds the largest bucket {buckets[-1]}")
  c = r = p = 0.0
  for n, k in counts.items():
    b = buckets[bisect.bisect_left(buckets, n)]
    c, r, p = c + k * cost(b), r + k * n, p + k * b
  return BucketPlan(tuple(buckets), c / total, r / total, p / total)


def plan_buckets(counts: Mapping[int, float], k: int, *, largest: int | None = None,
                 cost: Callable[[int], float] = float) -> BucketPlan:
  """The `k` buckets (at most; fewer when fewer sizes occur) minimising the expected cost of
  `counts` (size -> how often), the largest being `largest` (default: the largest size)."""
  if k < 1:
    raise ValueError(f"need at least one bucket, got {k}")
  sizes = sorted(n for n, w in counts.items() if w > 0)
  if not sizes:
    raise ValueError("no traffic recorded")
  top = max(sizes[-1], largest or 0)
  cands = sorted(set(sizes) | {top})  # every size is a candidate: its own traffic lands on it
  weight = [counts.get(c, 0) for c in cands]
  m = len(cands)
  k = min(k, m)
  inf = float("inf")
  # best[j][i]: least cost covering cands[..i] with j buckets, the last at cands[i]
  best = [[inf] * m for _ in range(k + 1)]
  back = [[-1] * m for _ in range(k + 1)]
  prefix = [0.0]
  for w in weight:
    prefix.append(prefix[-1] + w)
  for i in range(m):
    best[1][i] = prefix[i + 1] * cost(cands[i])
  for j in range(2, k + 1):
    for i in range(j - 1, m):
      for h in range(j - 2, i):
        v = best[j - 1][h] + (prefix[i + 1] - prefix[h + 1]) * cost(cands[i])
        if v < best[j][i]:
          best[j][i], back[j][i] = v, h
  j = min(range(1, k + 1), key=lambda jj: best[jj][m - 1])
  chosen, i = [], m - 1
  while i >= 0 and j >= 1:
    chosen.append(cands[i])
    i, j = back[j][i], j - 1
  return evaluate(counts, sorted(chosen), cost)
