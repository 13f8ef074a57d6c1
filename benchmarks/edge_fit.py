"""Where a load test's pass/fail verdicts turn: the offered load that passes half the time.

On a shared host a single LoadGen run near the edge passes or fails on noise, so one bisection
says little. Repeated runs at a grid of loads give P(VALID | QPS); a logistic curve fitted to
every verdict by maximum likelihood puts the edge at its 50% point (`fit_edge`), and resampling
the trials at each load (`bootstrap_gap`) says how sure a difference between two edges is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Edge:
  """The fitted 50% point (`qps`) and how it was found: `fit` when the verdicts turn inside the
  loads tried, `all_valid` (qps is the highest load tried: a lower bound) or `none_valid` (0)."""
  qps: float
  scale: float
  status: str


def _log_likelihood(qps: np.ndarray, valid: np.ndarray, centers: np.ndarray,
                    scales: np.ndarray) -> np.ndarray:
  """Bernoulli log-likelihood of P(valid) = 1 / (1 + exp((qps - center) / scale)), for every
  (center, scale) pair: an array [centers, scales]."""
  z = (centers[:, None, None] - qps[None, None, :]) / scales[None, :, None]
  log_p, log_q = -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z)  # log σ(z), log σ(-z)
  return np.where(valid[None, None, :], log_p, log_q).sum(axis=-1)


def fit_edge(qps: Sequence[float], valid: Sequence[bool]) -> Edge:
  """The load that passes half the time, from runs at `qps` with verdicts `valid`: a logistic
  curve falling with load, fitted by maximum likelihood over a dense grid of centres (the loads'
  span, widened by a fifth either side) and widths (0.5%-30% of the mean load)."""
  q = np.asarray(qps, dtype=float)
  v = np.asarray(valid, dtype=bool)
  if q.size == 0 or not v.any():
    return Edge(0.0, 0.0, "none_valid")
  if v.all():
    return Edge(float(q.max()), 0.0, "all_valid")
  lo, hi = q.min(), q.max()
  pad = 0.2 * max(hi - lo, 0.05 * hi)
  centers = np.linspace(lo - pad, hi + pad, 241)
  scales = q.mean() * np.geomspace(0.005, 0.3, 60)
  ll = _log_likelihood(q, v, centers, scales)
  i, j = np.unravel_index(np.argmax(ll), ll.shape)
  return Edge(float(centers[i]), float(scales[j]), "fit")


def bootstrap_gap(a: Sequence[tuple[float, bool]], b: Sequence[tuple[float, bool]], *,
                  draws: int = 200, seed: int = 0) -> dict[str, float]:
  """How sure is edge(b) > edge(a)? Each draw resamples, with replacement, the verdicts at every
  load separately for each side and refits both edges. Returns the gap b - a of the data, its
  10th and 90th percentiles over the draws, and the share of draws where b's edge is higher."""
  rng = np.random.default_rng(seed)

  def by_load(runs):
    groups: dict[float, list[bool]] = {}
    for load, ok in runs:
      groups.setdefault(float(load), []).append(bool(ok))
    return [(load, np.array(oks)) for load, oks in sorted(groups.items())]

  def resampled(groups):
    loads, oks = [], []
    for load, verdicts in groups:
      loads += [load] * len(verdicts)
      oks += list(rng.choice(verdicts, size=len(verdicts)))
    return fit_edge(loads, oks).qps

  ga, gb = by_load(a), by_load(b)
  gaps = np.array([resampled(gb) - resampled(ga) for _ in range(draws)])
  point = fit_edge(*zip(*b)).qps - fit_edge(*zip(*a)).qps if a and b else 0.0
  return {"gap": float(point), "p10": float(np.percentile(gaps, 10)),
          "p90": float(np.percentile(gaps, 90)), "share_b_higher": float(np.mean(gaps > 0))}
