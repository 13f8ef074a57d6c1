"""Padding waste of candidate (batch x sequence) bucket grids on realistic ads length mixes.

    python benchmarks/padding.py [--requests N] [--out DIR]

Workloads (token counts, seeded): search queries (short, ~3-12 tokens), ad texts (a few
dozen tokens), and query-ad pairs for the cross-encoder (query + ad + 3 special tokens,
~20-80). For each candidate sequence grid it reports:
  seq-only   sum(seq bucket of each request) / sum(real tokens): padding of the sequence
             dimension alone (each request run by itself)
  2-D        padded / real tokens when serving a Poisson stream through the real
             `serving.batching.seq.SeqBatcher` (one queue per sequence bucket, batch buckets
             1..64, dispatch when idle) on a simulated executor: batch and sequence padding
  1-queue    the same stream through one queue, each batch padded to its longest row's
             bucket (what grouping by length avoids)
  attn       the quadratic part: sum(batch x seq^2) / sum(real length^2), for the 2-D run
  wait       mean queueing delay of the 2-D run (more queues fill batches more slowly)
  shapes     compiled executables per signature = batch buckets x sequence buckets
A grid whose largest bucket is shorter than the workload's longest request is skipped.
Prints a table, writes padding.json and padding.png to --out (default bench_out/padding).
Pure Python and numpy: no JAX, runs in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a bare checkout
# pylint: disable=g-import-not-at-top
from serving.batching import BatchingConfig, Pending
from serving.batching import SeqBatcher
# pylint: enable=g-import-not-at-top

BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
MAX_LEN = 256

GRIDS: dict[str, tuple[int, ...]] = {
    "max only {256}": (256,),
    "coarse {16,64,256}": (16, 64, 256),
    "pow2 from 32": (32, 64, 128, 256),
    "pow2 from 16": (16, 32, 64, 128, 256),
    "pow2 from 8": (8, 16, 32, 64, 128, 256),
    "pow2 8..64": (8, 16, 32, 64),
    "half-octave from 8": (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256),
}


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int,
               hi: int) -> np.ndarray:
  return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def workloads(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Token lengths per workload: queries (median 6), ad texts (median 32), pairs (their sum + 3)."""
  rng = np.random.default_rng(seed)
  queries = _lognormal(rng, n, 6, 0.45, 1, 64)
  ads = _lognormal(rng, n, 32, 0.4, 4, MAX_LEN)
  pair_q = _lognormal(rng, n, 6, 0.45, 1, 64)
  pair_a = _lognormal(rng, n, 32, 0.4, 4, MAX_LEN)
  return {"query": queries, "ad": ads, "pair": np.minimum(pair_q + pair_a + 3, MAX_LEN)}


def service_s(batch: int, seq: int) -> float:
  """Simulated executor time of one batch: fixed launch cost + per padded token."""
  return 200e-6 + batch * seq * 0.5e-6


@dataclasses.dataclass
class SimResult:
  padded_tokens: int
  padded_attention: int
  batches: int
  mean_wait_s: float


def simulate(lengths: np.ndarray, seq_buckets: tuple[int, ...], rate: float, *,
             one_queue: bool = False, seed: int = 1) -> SimResult:
  """Serves a Poisson stream of 1-row requests through SeqBatcher on one simulated executor."""
  rng = np.random.default_rng(seed)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, len(lengths)))
  cfg = BatchingConfig(buckets=BATCH_BUCKETS, max_queue_delay_s=0.002, dispatch_when_idle=True,
                       max_queue_rows=1 << 20)
  # One queue: every request goes to the largest bucket's queue; the batch is then padded to
  # the bucket of its longest row (below).
  length_of: Callable[[tuple[int, int]], int] = (
      (lambda item: seq_buckets[-1]) if one_queue else (lambda item: item[1]))
  batcher: SeqBatcher = SeqBatcher(cfg, seq_buckets, length_of)
  bucket_of = lambda n: seq_buckets[int(np.searchsorted(seq_buckets, n))]
  t, busy_until, i, n = 0.0, 0.0, 0, len(lengths)
  padded = attention = batches = 0
  wait_total = 0.0
  while i < n or batcher.queued_rows:
    while i < n and arrivals[i] <= t:
      batcher.add(Pending((i, int(lengths[i])), 1, float(arrivals[i])))
      i += 1
    wait = None
    if t >= busy_until:
      d = batcher.decide(t, idle=True)
      if d.plan is not None:
        rows = [s.pending.item[1] for s in d.plan.slices]
        seq = bucket_of(max(rows)) if one_queue else d.plan.seq_bucket
        padded += d.plan.bucket * seq
        attention += d.plan.bucket * seq * seq
        batches += 1
        wait_total += sum(t - s.pending.arrival for s in d.plan.slices)
        busy_until = t + service_s(d.plan.bucket, seq)
        continue
      wait = d.wait_s
    events = [arrivals[i]] if i < n else []
    if busy_until > t:
      events.append(busy_until)
    if wait is not None:
      events.append(t + wait)
    t = max(t, min(events)) if events else t
  return SimResult(padded, attention, batches, wait_total / n)


def measure(n: int, rates: dict[str, float]) -> list[dict]:
  rows = []
  for workload, lengths in workloads(n).items():
    real = int(lengths.sum())
    real_attn = int((lengths.astype(np.int64) ** 2).sum())
    for grid, seq in GRIDS.items():
      if lengths.max() > seq[-1]:
        continue  # this grid would refuse part of the workload
      bucket = np.asarray(seq)[np.searchsorted(seq, lengths)]
      two_d = simulate(lengths, seq, rates[workload])
      one_q = simulate(lengths, seq, rates[workload], one_queue=True)
      rows.append({
          "workload": workload, "grid": grid, "seq_buckets": list(seq),
          "shapes": len(BATCH_BUCKETS) * len(seq),
          "seq_only": float(bucket.sum() / real),
          "two_d": two_d.padded_tokens / real,
          "one_queue": one_q.padded_tokens / real,
          "attention": two_d.padded_attention / real_attn,
          "mean_wait_ms": two_d.mean_wait_s * 1e3,
          "batches": two_d.batches,
          "real_tokens": real, "mean_length": float(lengths.mean()),
          "p50_p99_length": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 99))],
      })
  return rows


def table(rows: list[dict]) -> str:
  head = (f"{'workload':<8} {'grid':<20} {'shapes':>6} {'seq-only':>8} {'2-D':>6} {'1-queue':>8}"
          f" {'attn':>6} {'wait ms':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['workload']:<8} {r['grid']:<20} {r['shapes']:>6} {r['seq_only']:>8.2f}"
                 f" {r['two_d']:>6.2f} {r['one_queue']:>8.2f} {r['attention']:>6.2f}"
                 f" {r['mean_wait_ms']:>8.2f}")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  loads = sorted({r["workload"] for r in rows}, key=["query", "ad", "pair"].index)
  fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4.2), sharey=True)
  for ax, load in zip(axes, loads):
    sel = {r["grid"]: r for r in rows if r["workload"] == load}
    grids = [g for g in GRIDS if g in sel]
    x = np.arange(len(grids))
    ax.bar(x - 0.27, [sel[g]["seq_only"] for g in grids], 0.27, label="seq only")
    ax.bar(x, [sel[g]["two_d"] for g in grids], 0.27, label="2-D (per-length queues)")
    ax.bar(x + 0.27, [sel[g]["one_queue"] for g in grids], 0.27, label="one queue")
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{g}\n({sel[g]['shapes']} shapes)" for g in grids], rotation=60,
                  ha="right", fontsize=7)
    ax.set_title(f"{load} (median {sel[grids[0]]['p50_p99_length'][0]} tokens, p99"
                 f" {sel[grids[0]]['p50_p99_length'][1]})")
  axes[0].set_ylabel("padded tokens / real tokens")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=20000, help="requests per workload")
  parser.add_argument("--out", default="bench_out/padding", help="folder for JSON and PNG")
  args = parser.parse_args(argv)
  # Arrival rates: moderate load on the simulated executor (batches of a few to a few dozen).
  rates = {"query": 20000.0, "ad": 8000.0, "pair": 8000.0}
  rows = measure(args.requests, rates)
  print(table(rows))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "padding.json").write_text(json.dumps(
      {"batch_buckets": list(BATCH_BUCKETS), "rates_per_s": rates,
       "service_model": "200us + 0.5us per padded token", "rows": rows}, indent=1))
  plot(rows, out / "padding.png")
  print(f"\nwrote {out / 'padding.json'} and {out / 'padding.png'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
