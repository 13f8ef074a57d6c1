"""The workload of benchmarks/embedding_cache.py: the benchmark model's table sizes, a fixed
stream of requests whose ids are Zipf-distributed over each table's rows, its unique-id
statistics, and the hit rates of caches that know the traffic in advance (the oracles)."""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.loadgen import build_request

TABLE_SIZES = (1_000_000, 1_000_000, 50_000, 10_000, 2_000, 500, 100, 20)
BIG_TABLES = ("tables/t00", "tables/t01")  # the tables the ratios apply to
BUCKETS = (1, 64, 128, 256, 512)
NUM_DENSE = 13


def zipf_ids(rng: np.random.Generator, alpha: float, perm: np.ndarray, size: int) -> np.ndarray:
  """`size` rows of a table of len(perm) rows, rank k drawn with probability ∝ k^-alpha (any
  alpha > 0: a bounded Zipf, by inverse CDF) and mapped to row perm[k]."""
  w = np.arange(1, len(perm) + 1, dtype=np.float64) ** -alpha
  cdf = np.cumsum(w)
  cdf /= cdf[-1]
  ranks = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), len(perm) - 1)
  return perm[ranks]


@dataclasses.dataclass(frozen=True)
class Stream:
  """One alpha's fixed stream: `sparse` int64 [requests, rows, features] (-1: missing id),
  the serialized requests without a model name (`bodies`), each big table's rows hottest first
  (`hot`: the Zipf's rank order), and its id statistics."""

  alpha: float
  sparse: np.ndarray
  bodies: list[bytes]
  hot: list[np.ndarray]
  unique_per_request: float  # unique valid ids per request, mean over the big tables
  unique_per_batch: float  # the same per largest-bucket batch of consecutive requests

  @property
  def valid_per_request(self) -> np.ndarray:
    """int64 [requests]: valid ids (not -1) of each request in the big tables' features."""
    return (self.sparse[:, :, :len(self.hot)] >= 0).sum(axis=(1, 2))


def unique_ids(sparse: np.ndarray, features: list[int], rows: int) -> float:
  """Mean over `features` and over consecutive windows of `rows` rows of the stream of the
  number of distinct valid ids in the window (one window when the stream is shorter)."""
  flat = sparse.reshape(-1, sparse.shape[-1])
  rows = max(1, min(rows, len(flat)))
  n = len(flat) // rows
  out = []
  for f in features:
    win = np.sort(flat[:n * rows, f].reshape(n, rows), axis=1)
    distinct = (win[:, 1:] != win[:, :-1]).sum(axis=1) + 1
    out.append(distinct - (win[:, 0] < 0))  # -1 sorts first: one distinct value, not an id
  return float(np.mean(np.concatenate(out))) if out else 0.0


def make_stream(alpha: float, requests: int, rows: int, missing: float, seed: int) -> Stream:
  """The stream of `requests` requests of `rows` rows at `alpha`; the rows' permutations are
  fixed by `seed` (the same hot rows at every alpha), the draws depend on alpha too."""
  perm_rng = np.random.default_rng(seed)
  perms = [perm_rng.permutation(n) for n in TABLE_SIZES]
  rng = np.random.default_rng([seed, int(alpha * 1000)])
  n = requests * rows
  sparse = np.stack([zipf_ids(rng, alpha, p, n) for p in perms], axis=1)
  sparse[rng.random(sparse.shape) < missing] = -1
  sparse = sparse.reshape(requests, rows, len(TABLE_SIZES)).astype(np.int64)
  dense = rng.random((requests, rows, NUM_DENSE), dtype=np.float32)
  bodies = [build_request("", {"dense": d, "sparse": s}) for d, s in zip(dense, sparse)]
  big = list(range(len(BIG_TABLES)))
  return Stream(alpha, sparse, bodies, [perms[f] for f in big], unique_ids(sparse, big, rows),
                unique_ids(sparse, big, BUCKETS[-1]))


def oracle_hit_rates(stream: Stream, cache_rows: dict[int, int]) -> tuple[float, float]:
  """Hits / lookups (valid ids) over the stream of two caches that hold, per feature f,
  `cache_rows[f]` rows chosen in advance: the Zipf's truly hottest rows (what an ideal cache
  reaches in steady state), and the stream's own most frequent rows (also counts an id's
  first sighting as a hit: a bound no cache meets on a stream that does not repeat)."""
  flat = stream.sparse.reshape(-1, stream.sparse.shape[-1])
  zipf_hits = stream_hits = lookups = 0
  for f, k in cache_rows.items():
    ids = flat[:, f][flat[:, f] >= 0]
    top = np.zeros(TABLE_SIZES[f], bool)
    top[stream.hot[f][:k]] = True
    zipf_hits += int(top[ids].sum())
    stream_hits += int(np.sort(np.bincount(ids, minlength=TABLE_SIZES[f]))[::-1][:k].sum())
    lookups += len(ids)
  return (zipf_hits / lookups, stream_hits / lookups) if lookups else (1.0, 1.0)
