"""How a shadow version's scores differ from the served version's on the same rows, in numpy.

One `ScoreComparison` per (model, primary version, shadow version) takes each request's paired
per-row scores. Means (and so the mean shift and the calibration ratio) are exact running sums
over every row. Quantiles and the Spearman rank correlation come from a reservoir of paired
rows (Vitter's algorithm R, seeded): exact while the rows seen fit in it (4096 by default),
after that a uniform sample, so a quantile's rank error is about sqrt(q(1-q)/n) for n reservoir
rows (±0.8 percentile points, one standard error, at p50 for 4096). The top-changed share counts requests of more
than one row (a ranked list of candidates) whose highest-scored row differs between versions.
Without labels the calibration ratio (mean shadow / mean primary) is relative: how much the
candidate's average prediction moves, not whether either is calibrated against outcomes.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)


def average_ranks(a: np.ndarray) -> np.ndarray:
  """Ranks 0..n-1 of `a`, ties sharing their average rank (as Spearman's rho needs)."""
  _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
  ends = np.cumsum(counts)
  return ((ends - counts + ends - 1) / 2.0)[inverse.reshape(-1)]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
  """Spearman's rank correlation of paired samples; None with fewer than 2 rows or a constant
  side (undefined)."""
  if len(a) < 2:
    return None
  ra, rb = average_ranks(a), average_ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
  return float((ra * rb).sum() / denom) if denom > 0 else None


class ScoreComparison:
  """Accumulates paired scores of one (primary, shadow) pair; thread-safe."""

  def __init__(self, reservoir_rows: int = 4096, seed: int = 0):
    if reservoir_rows < 1:
      raise ValueError(f"reservoir_rows must be >= 1, got {reservoir_rows}")
    self._lock = threading.Lock()
    self._rng = np.random.default_rng(seed)
    self._pairs = np.empty((reservoir_rows, 2), np.float64)
    self.requests = 0
    self.rows = 0
    self._sums = np.zeros(2, np.float64)
    self.ranked_requests = 0  # requests with more than one row
    self.top_changed = 0

  def add(self, primary: np.ndarray, shadow: np.ndarray) -> None:
    """One request's scores (one per row, in row order) from both versions."""
    p = np.asarray(primary, np.float64).reshape(-1)
    s = np.asarray(shadow, np.float64).reshape(-1)
    if p.shape != s.shape:
      raise ValueError(f"primary has {p.size} scores, shadow {s.size}: not the same rows")
    pairs = np.stack([p, s], axis=1)
    with self._lock:
      self.requests += 1
      self._sums += pairs.sum(axis=0)
      if len(p) > 1:
        self.ranked_requests += 1
        self.top_changed += int(np.argmax(p) != np.argmax(s))
      self._sample(pairs)
      self.rows += len(p)

  def _sample(self, pairs: np.ndarray) -> None:
    """Algorithm R over the rows in arrival order (call with the lock held)."""
    cap, seen = len(self._pairs), self.rows
    fill = max(0, min(len(pairs), cap - seen))
    self._pairs[seen:seen + fill] = pairs[:fill]
    rest = pairs[fill:]
    if len(rest):
      slots = self._rng.integers(0, np.arange(seen + fill, seen + len(pairs)) + 1)
      for i in np.flatnonzero(slots < cap):  # in order: a later row replaces an earlier one
        self._pairs[slots[i]] = rest[i]

  def report(self) -> dict[str, Any]:
    """The comparison so far (None where a figure is undefined, e.g. before any row)."""
    with self._lock:
      n, sums = self.rows, self._sums.copy()
      sample = self._pairs[:min(n, len(self._pairs))].copy()
      requests, ranked, changed = self.requests, self.ranked_requests, self.top_changed
    out: dict[str, Any] = {"requests": requests, "rows": n, "reservoir_rows": len(sample),
                           "exact_quantiles": n <= len(self._pairs),
                           "ranked_requests": ranked,
                           "top_changed_share": changed / ranked if ranked else None}
    if n == 0:
      return out | {"mean_primary": None, "mean_shadow": None, "mean_shift": None,
                    "calibration_ratio": None, "spearman": None, "quantiles": {}}
    mp, ms = float(sums[0] / n), float(sums[1] / n)
    qp = np.quantile(sample[:, 0], QUANTILES)
    qs = np.quantile(sample[:, 1], QUANTILES)
    return out | {
        "mean_primary": mp, "mean_shadow": ms, "mean_shift": ms - mp,
        "calibration_ratio": ms / mp if mp != 0 else None,
        "spearman": spearman(sample[:, 0], sample[:, 1]),
        "quantiles": {f"p{round(q * 100)}": {"primary": float(a), "shadow": float(b),
                                              "shift": float(b - a)}
                      for q, a, b in zip(QUANTILES, qp, qs)}}
