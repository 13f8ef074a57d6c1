"""A discrete-event simulation of one replica: Poisson arrivals into the server's own row
batcher (serving/batching, its real decisions: buckets, holds, admission, the queue-wait bound),
batches run back to back on `instances` executors for the measured per-bucket times plus a host
cost per request. What capacity planning checks its plan against."""

from __future__ import annotations

import dataclasses
import heapq
import random
from typing import Any, Mapping

import numpy as np

from serving.batching import Admission, Batcher, BatchingConfig, Pending


@dataclasses.dataclass(frozen=True)
class Replica:
  """What one replica does: seconds per batch of each bucket (measured) and host seconds per
  request (the front end's share: parse, queue, answer)."""

  bucket_seconds: Mapping[int, float]
  host_s_per_request: float = 0.0
  instances: int = 1

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted(int(b) for b in self.bucket_seconds))


@dataclasses.dataclass(frozen=True)
class SimResult:
  latencies_s: np.ndarray  # answered requests
  shed: int
  seconds: float

  @property
  def answered_rps(self) -> float:
    return len(self.latencies_s) / self.seconds

  def p(self, q: float) -> float:
    """Latency percentile in seconds; a shed request counts as infinitely late."""
    lat = np.sort(np.concatenate([self.latencies_s, np.full(self.shed, np.inf)]))
    if not len(lat):
      return float("nan")
    return float(lat[min(len(lat) - 1, int(np.ceil(q / 100 * len(lat))) - 1)])  # nearest rank


def simulate(replica: Replica, *, rate: float, rows: int, seconds: float, seed: int = 0,
             latency_slo_s: float | None = None, max_queue_delay_s: float = 0.002,
             batcher: Any = None) -> SimResult:
  """Requests of `rows` rows arriving at `rate`/s for `seconds` into one replica's batcher
  (`batcher`: one already made, e.g. the native queue's decisions; default a Batcher)."""
  if batcher is None:
    batcher = Batcher(BatchingConfig(buckets=replica.buckets, max_queue_delay_s=max_queue_delay_s,
                                     max_queue_rows=max(1 << 20, replica.buckets[-1]),
                                     latency_slo_s=latency_slo_s))
  for b, s in replica.bucket_seconds.items():
    batcher.observe(int(b), float(s))
  rng = random.Random(seed)
  busy: list[tuple[float, int, list[float]]] = []  # (done at, instance, arrivals), a heap
  free = list(range(replica.instances))
  nxt, wake, t, n = rng.expovariate(rate), None, 0.0, 0
  lat, shed = [], 0
  while True:
    done_at = busy[0][0] if busy else np.inf
    decide_at = wake if (wake is not None and free) else np.inf
    if nxt < seconds and nxt <= min(done_at, decide_at):
      t = nxt
      try:
        batcher.add(Pending(n, rows, t))
      except Admission:
        shed += 1
      n += 1
      nxt, wake = t + rng.expovariate(rate), t
      continue
    if done_at <= decide_at and busy:
      t, inst, arrivals = heapq.heappop(busy)
      lat += [t - a for a in arrivals]
      free.append(inst)
      wake = t
      continue
    if decide_at == np.inf:
      return SimResult(np.asarray(lat), shed, seconds)
    t, wake = decide_at, None
    d = batcher.decide(t, idle=len(free) == replica.instances)
    shed += len(d.expired)
    if d.plan is None:
      wake = None if d.wait_s is None else t + d.wait_s
      continue
    took = replica.bucket_seconds[d.plan.bucket] + replica.host_s_per_request * len(d.plan.slices)
    inst = free.pop()
    finished = [s.pending.arrival for s in d.plan.slices if s.last]
    heapq.heappush(busy, (t + took, inst, finished))
    wake = t if free else None


def capacity_at(replica: Replica, *, rows: int, p99_s: float, seconds: float = 30.0,
                latency_slo_s: float | None = None, steps: int = 12) -> float:
  """The highest Poisson rate (requests/s) whose simulated p99 (shed counted as late) stays
  within `p99_s`: bisection between 0 and the replica's full-batch ceiling."""
  full = replica.buckets[-1]
  ceiling = replica.instances * full / (replica.bucket_seconds[full]
                                        + replica.host_s_per_request * max(1, full // rows)) / rows
  lo, hi = 0.0, ceiling
  for i in range(steps):
    mid = (lo + hi) / 2
    r = simulate(replica, rate=mid, rows=rows, seconds=seconds, seed=i,
                 latency_slo_s=latency_slo_s)
    if r.p(99) <= p99_s:
      lo = mid
    else:
      hi = mid
  return lo
