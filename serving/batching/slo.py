"""Scheduling by a latency target, in plain Python: the load a queue sees and what the target
allows. The row Batcher asks it (admission, the queue-wait bound, how long to hold a partial
batch for a fuller one); the native queue (frontend/native/slo.cc, batcher.cc) is a port,
checked against it on a shared table of cases.

Two rates, both from what the batcher already sees: the *arrival* rate (rows/s, an
exponentially decaying count of recent arrivals, so it falls when traffic stops) and the
*drain* rate (rows/s the queue actually moves while a full batch is waiting: the host path's
per-request cost included, which per-bucket batch times alone miss when requests are small).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from bundle import smallest_bucket

RATE_WINDOW_S = 0.1  # memory of the arrival rate (decay time constant)
SLO_HEADROOM = 0.2  # share of the target kept for delivery and the estimates' own error
MAX_FILL_SHARE = 0.1  # longest hold for a fuller batch, as a share of the target
HOLD_UTILIZATION = 0.5  # holds while batches of the queued size keep the executor busier than this
DRAIN_SMOOTHING = 0.2  # weight of each new drain sample
DRAIN_MIN_SAMPLES = 4  # a drain rate is used once this many samples agree on it
DRAIN_MAX_GROWTH = 4.0  # one sample's interval counts as at most this many times the smoothed one
# A drain rate not measured again for this long is forgotten, and the next sample starts anew:
# it was measured on other traffic (after 1-row requests, 32-row ones drain 20x more rows/s),
# and one that refuses all but what it predicts would never see the backlog that corrects it.
DRAIN_STALE_S = 1.0


class LoadMeter:
  """Arrival and drain rates of one queue; not thread-safe (the batcher's owner locks)."""

  def __init__(self) -> None:
    self._arrived = 0.0  # decayed rows; a steady rate r holds it near r * RATE_WINDOW_S
    self._arrived_t: float | None = None
    self._take_t: float | None = None
    self._backlogged = False  # a full batch was still queued after the last take
    self._drain_rows: float | None = None
    self._drain_dt = 0.0
    self._drain_samples = 0
    self._drain_t = 0.0  # when the last drain sample was taken

  def arrived(self, t: float, rows: int) -> None:
    """Counts `rows` arriving at `t` (arrivals may come slightly out of order)."""
    if self._arrived_t is None:
      self._arrived, self._arrived_t = float(rows), t
      return
    if t > self._arrived_t:
      self._arrived *= math.exp((self._arrived_t - t) / RATE_WINDOW_S)
      self._arrived_t = t
    self._arrived += rows

  def arrival_rate(self, now: float) -> float:
    """Rows per second arriving lately, decayed to `now`."""
    if self._arrived_t is None:
      return 0.0
    return self._arrived * math.exp(min(0.0, self._arrived_t - now) / RATE_WINDOW_S) / RATE_WINDOW_S

  def taken(self, now: float, rows: int, backlogged: bool) -> None:
    """A batch of `rows` left the queue at `now`; `backlogged`: a full batch is still queued.
    The time since the previous take is a drain sample when the queue stayed backlogged."""
    if self._take_t is not None and self._backlogged and now > self._take_t:
      dt = now - self._take_t
      if self._drain_rows is None or now - self._drain_t > DRAIN_STALE_S:
        self._drain_rows, self._drain_dt, self._drain_samples = float(rows), dt, 0
      else:  # a stall (a new version's first batches, a pause) must not shed for long
        self._drain_rows += DRAIN_SMOOTHING * (rows - self._drain_rows)
        self._drain_dt += DRAIN_SMOOTHING * (min(dt, DRAIN_MAX_GROWTH * self._drain_dt)
                                             - self._drain_dt)
      self._drain_samples += 1
      self._drain_t = now
    if self._take_t is None or now > self._take_t:
      self._take_t = now
    self._backlogged = backlogged

  def drain_rate(self, now: float) -> float | None:
    """Rows per second the queue moved while backlogged; None before DRAIN_MIN_SAMPLES, and
    once no sample came for DRAIN_STALE_S."""
    if (self._drain_rows is None or self._drain_samples < DRAIN_MIN_SAMPLES
        or now - self._drain_t > DRAIN_STALE_S):
      return None
    return self._drain_rows / self._drain_dt


def slo_budget_s(latency_slo_s: float | None, queue_wait_bound_s: float | None) -> float | None:
  """The time a new request's estimated finish must fit in to be admitted: the latency target
  less SLO_HEADROOM, or the queue-wait bound when no target is set; None: no bound."""
  if latency_slo_s is not None:
    return latency_slo_s * (1.0 - SLO_HEADROOM)
  return queue_wait_bound_s


def fill_wait_s(*, now: float, oldest: float, queued: int, buckets: Sequence[int],
                batch_s: Mapping[int, float], arrival_rate: float, latency_slo_s: float) -> float:
  """Seconds worth holding a partial batch of `queued` rows for arrivals; 0: run now.

  A batch's time is mostly fixed cost when rows are few (a dispatch, a wake-up, an answer
  pass), so under load small batches spend the cores the queue needs. The executor's share of
  busy time if batches of `n` rows keep up with arrivals is arrival_rate x batch_s[bucket] / n.
  While that share at the queued size passes HOLD_UTILIZATION, hold for the smallest bucket
  that brings it under (else the bucket that comes closest), as long as the rows would come,
  at the arrival rate, within MAX_FILL_SHARE of the target and the batch would finish inside
  the target's budget. Below that load a hold is pure latency, and none is taken. (The Batcher
  holds a batch once: when the hold ends, what came runs.)"""
  if arrival_rate <= 0.0 or queued <= 0:
    return 0.0
  own = smallest_bucket(buckets, queued)
  if own is None or own not in batch_s:
    return 0.0
  best_wait, best_share = 0.0, arrival_rate * batch_s[own] / queued
  if best_share <= HOLD_UTILIZATION:
    return 0.0
  age = now - oldest
  for bucket in buckets:
    if bucket <= queued or bucket not in batch_s:
      continue
    wait = (bucket - queued) / arrival_rate
    if (age + wait > latency_slo_s * MAX_FILL_SHARE
        or age + wait + batch_s[bucket] > latency_slo_s * (1.0 - SLO_HEADROOM)):
      break  # larger buckets take longer to fill and to run
    share = arrival_rate * batch_s[bucket] / bucket
    if share < best_share:
      best_wait, best_share = wait, share
    if share <= HOLD_UTILIZATION:
      break
  return best_wait


def capped_batch_seconds(observed: dict[int, float]) -> dict[int, float]:
  """Per-bucket batch seconds, each at most the time of the smaller timed buckets that would run
  its rows (ceil(b / c) batches of c): a bucket timed once in a slow moment, then never run
  again because its estimate sheds the queue that would fill it, must not keep shedding."""
  out: dict[int, float] = {}
  for b in sorted(observed):
    out[b] = min([observed[b]] + [-(-b // c) * t for c, t in out.items()])
  return out
