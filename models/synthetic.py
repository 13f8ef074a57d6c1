"""A synthetic click log with a planted signal, so demo CTR models have something real to learn.

A hidden logistic model makes the labels: logit = base + w . dense + sum over a few categorical
features of a per-id effect. Ids are Zipf-distributed (a few hot ids, a long tail) and scattered
over each vocabulary by a fixed bijection; some are missing (-1). Everything is a function of the
seed (the hidden model) and the stream (which rows): no downloads, same bytes on every machine.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from models.dlrm import DEMO_TABLE_SIZES, DLRMConfig


@dataclasses.dataclass(frozen=True, slots=True)
class ClickLogConfig:
  """Shape and strength of the planted signal."""

  num_dense: int = 13
  vocab_sizes: tuple[int, ...] = DEMO_TABLE_SIZES
  signal_features: tuple[int, ...] = (0, 1, 2, 3)  # categorical features with per-id effects
  zipf_exponent: float = 1.1  # P(rank k) ~ 1 / (k + 1) ** exponent over each vocabulary
  missing_rate: float = 0.03  # fraction of ids that are -1
  dense_signal: float = 1.0  # std of the dense part of the logit
  id_signal: float = 0.7  # std of one feature's per-id effect
  base_logit: float = -1.3  # about 25% clicks

  def __post_init__(self):
    if self.num_dense < 1 or not self.vocab_sizes or min(self.vocab_sizes) < 1:
      raise ValueError(f"need num_dense >= 1 and positive vocab_sizes, got {self}")
    if any(not 0 <= f < len(self.vocab_sizes) for f in self.signal_features):
      raise ValueError(f"{self.signal_features=} must index vocab_sizes ({len(self.vocab_sizes)})")
    if self.zipf_exponent <= 0 or not 0 <= self.missing_rate < 1:
      raise ValueError(f"{self.zipf_exponent=} must be > 0 and {self.missing_rate=} in [0, 1)")

  @property
  def num_sparse(self) -> int:
    return len(self.vocab_sizes)

  @classmethod
  def for_dlrm(cls, config: DLRMConfig, **overrides) -> ClickLogConfig:
    """A log whose features and id spaces match a DLRM config (one id space per table)."""
    return cls(num_dense=config.num_dense, vocab_sizes=config.table_sizes, **overrides)


@dataclasses.dataclass(frozen=True, slots=True)
class ClickLog:
  """Rows of a click log: model inputs, labels, and the hidden model's logits (the oracle)."""

  dense: np.ndarray  # [N, num_dense] float32
  sparse: np.ndarray  # [N, num_sparse] int64, -1 = missing
  labels: np.ndarray  # [N] float32 in {0, 1}
  logits: np.ndarray  # [N] float32, the planted logit (best possible score)

  def __len__(self) -> int:
    return len(self.labels)

  def batches(self, size: int):
    """Consecutive (dense, sparse, labels) slices of `size` rows (the last may be shorter)."""
    for i in range(0, len(self), size):
      yield self.dense[i:i + size], self.sparse[i:i + size], self.labels[i:i + size]


def _coprime_multiplier(vocab: int, rng: np.random.Generator) -> int:
  """A multiplier m with gcd(m, vocab) = 1, so rank -> (rank * m + c) % vocab is a bijection."""
  while True:
    m = int(rng.integers(vocab // 3 + 1, 2 * vocab + 7))
    if math.gcd(m, vocab) == 1:
      return m


@dataclasses.dataclass(frozen=True, slots=True)
class PlantedModel:
  """The hidden model behind a click log; `sample` draws rows from it."""

  config: ClickLogConfig
  seed: int
  dense_weights: np.ndarray  # [num_dense] float64
  id_effects: dict[int, np.ndarray]  # feature -> [vocab] float32 effect per id
  multipliers: tuple[int, ...]  # per feature, rank -> id bijection
  shifts: tuple[int, ...]
  cdfs: tuple[np.ndarray, ...]  # per feature, Zipf CDF over ranks

  @classmethod
  def create(cls, config: ClickLogConfig, seed: int = 0) -> PlantedModel:
    """Draws the hidden model from `seed` (same seed, same model)."""
    rng = np.random.default_rng([seed, 0x5EED])
    w = rng.normal(size=config.num_dense)
    w *= config.dense_signal / np.linalg.norm(w)  # dense ~ N(0, I) -> w . dense ~ N(0, signal^2)
    effects = {f: (config.id_signal * rng.normal(size=config.vocab_sizes[f])).astype(np.float32)
               for f in config.signal_features}
    mults = tuple(_coprime_multiplier(v, rng) for v in config.vocab_sizes)
    shifts = tuple(int(rng.integers(0, v)) for v in config.vocab_sizes)
    cdfs = []
    for v in config.vocab_sizes:
      p = 1.0 / np.arange(1, v + 1, dtype=np.float64) ** config.zipf_exponent
      cdf = np.cumsum(p)
      cdfs.append(cdf / cdf[-1])
    return cls(config, seed, w, effects, mults, shifts, tuple(cdfs))

  def sample(self, num_rows: int, stream: int = 0) -> ClickLog:
    """`num_rows` rows of stream `stream` (0 = training, 1 = held out, ...): disjoint draws."""
    cfg = self.config
    rng = np.random.default_rng([self.seed, 0xC11C, stream])
    dense = rng.normal(size=(num_rows, cfg.num_dense)).astype(np.float32)
    sparse = np.empty((num_rows, cfg.num_sparse), np.int64)
    for f, vocab in enumerate(cfg.vocab_sizes):
      ranks = np.minimum(np.searchsorted(self.cdfs[f], rng.random(num_rows)), vocab - 1)
      sparse[:, f] = (ranks * self.multipliers[f] + self.shifts[f]) % vocab
    sparse[rng.random(sparse.shape) < cfg.missing_rate] = -1
    logits = cfg.base_logit + dense.astype(np.float64) @ self.dense_weights
    for f, effect in self.id_effects.items():
      ids = sparse[:, f]
      logits += np.where(ids >= 0, effect[np.maximum(ids, 0)], 0.0)
    labels = (rng.random(num_rows) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    return ClickLog(dense, sparse, labels, logits.astype(np.float32))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U, ties counted half); nan without both classes."""
  labels = np.asarray(labels).reshape(-1) > 0.5
  scores = np.asarray(scores, np.float64).reshape(-1)
  pos, n = int(labels.sum()), len(labels)
  if pos == 0 or pos == n:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(n, np.float64)
  # Average rank per run of equal scores.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts + 1) / 2.0  # 1-based average rank of each run
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * (n - pos)))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy of probabilities against 0/1 labels (probs clipped to [eps, 1-eps])."""
  y = np.asarray(labels, np.float64).reshape(-1)
  p = np.clip(np.asarray(probs, np.float64).reshape(-1), eps, 1 - eps)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
