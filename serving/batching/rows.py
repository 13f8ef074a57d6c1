"""Dynamic batching decisions in plain Python: which rows go into the next batch, at which bucket.

No JAX and no tensors here (the runner executes what this decides), so every
policy is unit-tested in microseconds. The number of compiled shapes equals the
number of buckets: a batch is padded up to a bucket. A full batch is the largest bucket; a
partial one goes in the bucket that moves the most queued rows per second of measured batch
time (usually the smallest that fits; a smaller one when padding would cost more than it saves).

Policy: requests wait in priority order (lower number first, FIFO within a
priority). A full batch (largest bucket) is released at once, even while another
runs. A partial batch is released only when the executor is free: at once with
`dispatch_when_idle`, else once the oldest request has waited `max_queue_delay_s`.
Under load, batches grow on their own while the previous one runs, and a lone
request pays no batching delay. A
request larger than the largest bucket is split across batches, never refused.
Requests whose deadline has passed are expired, never executed. With `max_batch_requests`, a
batch also holds at most that many requests (a full batch is that many, too).

Admission (overload): a request is refused at once when the queue holds
`max_queue_rows` rows or `max_queue_requests` requests, or when it carries a
deadline that the rows queued ahead of it cannot meet at the measured batch rate
(`observe`), so excess load is shed at the door instead of timing out in the queue.
The estimate must fit in (1 - `deadline_headroom`) of the time left: the rest covers
delivering the answer and the estimate's own error.

Latency target (`latency_slo_s`, see slo.py): queueing is bounded in time. A request is refused
at the door when the queue ahead (at the measured drain rate) plus its own batch would not
finish inside the target less headroom; an admitted request still unstarted after
`queue_wait_bound_s` (the target, else `max_queue_wait_s`) is shed, never run late. With a
target, an idle executor under load holds a partial batch briefly for a bucket whose batches it
keeps up with at the arrival rate, when the rows would come in time (`slo.fill_wait_s`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Deque, Generic, Iterable, TypeVar

from serving.batching.admission import check_budget, check_deadline, check_queue_bounds
from serving.batching.config import BatchingConfig
from serving.batching.slo import LoadMeter, capped_batch_seconds, fill_wait_s, slo_budget_s

T = TypeVar("T")
SMALLER_BUCKET_GAIN = 0.15  # rows/s a smaller bucket must add before queued rows wait for it
OBSERVE_MAX_GROWTH = 4.0  # one batch counts as at most this many times the smoothed time


@dataclasses.dataclass(slots=True, eq=False)
class Pending(Generic[T]):
  """A queued request as the batcher sees it: rows, timing, and how many rows are taken."""

  item: T
  rows: int
  arrival: float
  deadline: float | None = None
  priority: int = 0
  taken: int = 0  # rows already placed into batches (a request may span several)
  expires: float | None = None  # unstarted past this, it is failed: its deadline or wait bound

  @property
  def remaining(self) -> int:
    return self.rows - self.taken


@dataclasses.dataclass(frozen=True, slots=True)
class Slice(Generic[T]):
  """Rows [start, start + rows) of `pending.item` go to batch rows [dest, dest + rows)."""

  pending: Pending[T]
  start: int
  rows: int
  dest: int

  @property
  def last(self) -> bool:
    """Whether this slice finishes its request."""
    return self.start + self.rows == self.pending.rows


@dataclasses.dataclass(frozen=True, slots=True)
class BatchPlan(Generic[T]):
  """One batch to execute: the bucket, where each slice goes, and how many rows are padding."""

  bucket: int
  slices: tuple[Slice[T], ...]

  @property
  def rows(self) -> int:
    return sum(s.rows for s in self.slices)

  @property
  def padding(self) -> int:
    return self.bucket - self.rows


@dataclasses.dataclass(frozen=True, slots=True)
class Decision(Generic[T]):
  """What to do now: run `plan` (or nothing), fail `expired`, and when to look again."""

  plan: BatchPlan[T] | None
  expired: tuple[Pending[T], ...] = ()
  wait_s: float | None = None  # None: sleep until something new arrives


class Batcher(Generic[T]):
  """Holds the queue of one model and decides its batches; not thread-safe (the runner locks)."""

  def __init__(self, config: BatchingConfig, executors: int = 1):
    if executors < 1:
      raise ValueError(f"executors must be >= 1, got {executors}")
    self.config = config
    self._executors = executors  # full batches that run at once (the runner's instances)
    self._queues: dict[int, Deque[Pending[T]]] = {}
    self._rows = 0
    self._requests = 0  # queued requests, kept incrementally: read on every submit
    self._prio_rows: dict[int, int] = {}  # queued rows per priority: admission reads it per request
    self._next_deadline: float | None = None  # no unstarted request expires before (may be early)
    self._observed_s: dict[int, float] = {}  # smoothed seconds a batch occupied the executor
    self._batch_s: dict[int, float] = {}  # the same, capped sub-additively (see observe)
    self._load = LoadMeter()
    self._free_at: float | None = None  # when the executor finishes what it took (projected)
    self._hold_end: float | None = None  # the hold for the next batch ends then (one per batch)

  def observe(self, bucket: int, seconds: float) -> None:
    """Records how long a batch of `bucket` rows occupied the executor (smoothed per bucket)."""
    if seconds > 0:
      old = self._observed_s.get(bucket)
      # A stall (a collector pause, a busy core) must not make every estimate shed at once.
      self._observed_s[bucket] = (seconds if old is None
                                  else 0.8 * old + 0.2 * min(seconds, OBSERVE_MAX_GROWTH * old))
      self._batch_s = capped_batch_seconds(self._observed_s)

  @property
  def _full_batch_s(self) -> float | None:
    """Seconds per largest-bucket batch; until one ran, the largest bucket timed so far (an
    underestimate that still bounds the queue from the first batch on)."""
    if not self._batch_s:
      return None
    return self._batch_s.get(self.config.max_batch_size, self._batch_s[max(self._batch_s)])

  def estimated_wait_s(self, rows: int, priority: int) -> float | None:
    """Seconds until a new request of `rows` at `priority` would finish: full batches for the
    rows queued ahead of it and its own, plus the two the executor may hold (one running, one
    prepared). None when nothing is queued ahead or no full batch has been timed yet."""
    ahead = self._rows_ahead(priority)
    if ahead == 0 or self._full_batch_s is None:
      return None
    return (-(-(ahead + rows) // self.config.max_batch_size) + 2) * self._full_batch_s

  def _rows_ahead(self, priority: int) -> int:
    """Rows queued at `priority` or higher (lower numbers): what a new request waits behind."""
    return sum(rows for prio, rows in self._prio_rows.items() if prio <= priority)

  def _rows_s(self, n: int, full_s: float) -> float:
    """Seconds until the last of `n` rows is done, run as full batches (on every executor at
    once) and then one partial batch, at the measured batch times."""
    full, part = divmod(n, self.config.max_batch_size)
    if not part:
      return (full - 1) * full_s / self._executors + full_s
    return full * full_s / self._executors + self._batch_s.get(self.config.bucket_for(part),
                                                                full_s)

  def estimated_latency_s(self, rows: int, priority: int, now: float) -> float | None:
    """Seconds from `now` until a new request would finish, for the latency budget: what is
    left of the batches the executor took (projected from their measured times), then the rows
    queued ahead and its own as batches at their measured times or, once the queue was
    backlogged, the rows ahead at the measured drain rate (the host path's cost included) and
    its own batch, whichever is longer. None when nothing is queued ahead or nothing was timed."""
    full_s = self._full_batch_s
    ahead = self._rows_ahead(priority)
    if ahead == 0 or full_s is None:
      return None
    queued = self._rows_s(ahead + rows, full_s)
    if rate := self._load.drain_rate(now):
      queued = max(queued, ahead / rate + self._rows_s(rows, full_s))
    held = max(0.0, self._free_at - now) if self._free_at is not None else 0.0
    return held + queued

  @property
  def queued_rows(self) -> int:
    return self._rows

  @property
  def queued_requests(self) -> int:
    return self._requests

  def add(self, pending: Pending[T]) -> None:
    """Queues a request, or raises Admission (queue bounds, or a deadline the queue cannot meet)."""
    if pending.rows < 1:
      raise ValueError(f"a request needs at least one row, got {pending.rows}")
    cfg = self.config
    check_queue_bounds(queued_rows=self._rows, queued_requests=self._requests,
                       rows=pending.rows, max_queue_rows=cfg.max_queue_rows,
                       max_queue_requests=cfg.max_queue_requests)
    if pending.deadline is not None:
      check_deadline(wait_s=self.estimated_wait_s(pending.rows, pending.priority),
                     left_s=pending.deadline - pending.arrival, headroom=cfg.deadline_headroom)
    bound = cfg.queue_wait_bound_s
    if (budget := slo_budget_s(cfg.latency_slo_s, bound)) is not None:
      check_budget(estimate_s=self.estimated_latency_s(pending.rows, pending.priority,
                                                       pending.arrival),
                   budget_s=budget, latency_slo_s=cfg.latency_slo_s)
    pending.expires = pending.deadline
    if bound is not None and (pending.expires is None or pending.arrival + bound < pending.expires):
      pending.expires = pending.arrival + bound
    self._load.arrived(pending.arrival, pending.rows)
    if self._rows == 0:
      self._hold_end = None  # a new batch begins: it may be held once
    q = self._queues.get(pending.priority)
    if q is None:
      q = self._queues[pending.priority] = collections.deque()
    q.append(pending)
    self._requests += 1
    self._rows += pending.rows
    self._prio_rows[pending.priority] = self._prio_rows.get(pending.priority, 0) + pending.rows
    if pending.expires is not None and (self._next_deadline is None
                                        or pending.expires < self._next_deadline):
      self._next_deadline = pending.expires

  def _unqueue(self, priority: int, rows: int) -> None:
    """Books `rows` of `priority` as gone from the queue (taken, expired or removed)."""
    self._rows -= rows
    left = self._prio_rows[priority] - rows
    if left:
      self._prio_rows[priority] = left
    else:
      del self._prio_rows[priority]

  def remove(self, pendings: Iterable[Pending[T]]) -> None:
    """Drops requests (cancelled by their client) from the queue."""
    doomed = {id(p) for p in pendings}
    for prio, q in list(self._queues.items()):
      kept = collections.deque()
      for p in q:
        if id(p) not in doomed:
          kept.append(p)
          continue
        self._requests -= 1
        if p.remaining:
          self._unqueue(prio, p.remaining)
      if kept:
        self._queues[prio] = kept
      else:
        del self._queues[prio]

  def drain(self) -> list[Pending[T]]:
    """Removes and returns everything queued (shutdown or model unload)."""
    out = [p for prio in sorted(self._queues) for p in self._queues[prio]]
    self._queues.clear()
    self._rows = 0
    self._requests = 0
    self._prio_rows.clear()
    self._next_deadline = None
    return out

  def oldest_arrival(self) -> float | None:
    """Arrival time of the longest-waiting queued request, or None when the queue is empty."""
    heads = [q[0].arrival for q in self._queues.values() if q]
    return min(heads) if heads else None

  def head_priority(self) -> int | None:
    """Priority of the request the next batch starts with, or None when the queue is empty."""
    levels = [prio for prio, q in self._queues.items() if q]
    return min(levels) if levels else None

  def expire(self, now: float) -> tuple[Pending[T], ...]:
    """Removes and returns the unstarted requests whose deadline or wait bound has passed."""
    return self._expire(now)

  def _ordered(self) -> Iterable[Pending[T]]:
    for prio in sorted(self._queues):
      yield from self._queues[prio]

  def _expire(self, now: float) -> tuple[Pending[T], ...]:
    if self._next_deadline is None or now < self._next_deadline:
      return ()  # nothing can have expired: no scan (decide runs once a batch)
    expired, soonest = [], None
    for prio, q in list(self._queues.items()):
      keep = collections.deque()
      for p in q:
        if p.expires is None or p.taken:  # a started request is finished, deadline or not
          keep.append(p)
        elif p.expires <= now:
          expired.append(p)
          self._requests -= 1
          self._unqueue(prio, p.remaining)
        else:
          keep.append(p)
          soonest = p.expires if soonest is None else min(soonest, p.expires)
      if keep:
        self._queues[prio] = keep
      else:
        del self._queues[prio]  # empty levels are dropped: priorities are client-chosen
    self._next_deadline = soonest
    return tuple(expired)

  def decide(self, now: float, *, idle: bool) -> Decision[T]:
    """Returns the next batch (if one should run now), the expired requests, and the wait."""
    expired = self._expire(now)
    if self._rows == 0:
      return Decision(None, expired, None)
    cfg = self.config
    oldest = min(q[0].arrival for q in self._queues.values() if q)
    full = self._rows >= cfg.max_batch_size or (
        cfg.max_batch_requests is not None and self._requests >= cfg.max_batch_requests)
    timed_out = now - oldest >= cfg.max_queue_delay_s
    # While a batch runs, only a full batch goes ahead (pipelined); a partial one waits for
    # the executor, growing meanwhile, so overload yields full batches, not half-empty ones.
    if not (full or (idle and (timed_out or cfg.dispatch_when_idle))):
      return Decision(None, expired, max(0.0, oldest + cfg.max_queue_delay_s - now))
    if not full and cfg.latency_slo_s is not None and cfg.dispatch_when_idle:
      hold = fill_wait_s(now=now, oldest=oldest, queued=self._rows, buckets=cfg.buckets,
                         batch_s=self._batch_s, arrival_rate=self._load.arrival_rate(now),
                         latency_slo_s=cfg.latency_slo_s)
      if hold > 0.0 and (self._hold_end is None or now < self._hold_end):
        if self._hold_end is None:  # held once: when it ends, what came runs
          self._hold_end = now + hold
        return Decision(None, expired, self._hold_end - now)
    self._hold_end = None
    plan = self._take(cfg.max_batch_size if full else self._capacity())
    self._load.taken(now, plan.rows, self._rows >= cfg.max_batch_size)
    self._took(now, plan.bucket, idle)
    return Decision(plan, expired, 0.0)

  def _took(self, now: float, bucket: int, idle: bool) -> None:
    """Projects when the executor that runs partial batches is free again: when idle, it runs
    this batch now. When busy with one executor, it queues this one behind what it holds, never
    more than the one running and the one prepared (the runner takes no further ahead), so an
    estimate a little slow cannot add up over a busy stretch. With several executors, a batch
    taken while busy is a full one that any of them may run: it leaves the projection alone."""
    took_s = self._batch_s.get(bucket, self._full_batch_s or 0.0)
    if idle or self._free_at is None or self._free_at < now:
      if idle or self._executors == 1:
        self._free_at = now + took_s
    elif self._executors == 1:
      self._free_at = min(self._free_at + took_s, now + 2 * took_s)

  def _capacity(self) -> int:
    """Rows for a partial batch: by measured batch times, the bucket that moves the most queued
    rows per second of executor time. 160 queued rows of 32-row requests run as 128 now and 32
    next rather than padded to 256 at twice the cost: under load, padding waste eats the
    capacity the queue needs to drain. A smaller bucket takes whole requests only (never splits
    one to fill up) and must win by SMALLER_BUCKET_GAIN."""
    cfg = self.config
    natural = cfg.bucket_for(self._rows)
    t_natural = self._batch_s.get(natural)
    if t_natural is None or natural == cfg.buckets[0]:
      return cfg.max_batch_size
    sizes, total = [], 0  # whole-request prefix sums, in take order, below `natural`
    for p in self._ordered():
      total += p.remaining
      if total >= natural:
        break
      sizes.append(total)
    best, best_rate = cfg.max_batch_size, self._rows / t_natural * (1.0 + SMALLER_BUCKET_GAIN)
    for bucket in reversed(cfg.buckets):  # largest first: a tie keeps fewer rows waiting
      t = self._batch_s.get(bucket)
      if bucket >= natural or t is None:
        continue
      rows = max((n for n in sizes if n <= bucket), default=0)
      if rows and rows / t > best_rate:
        best, best_rate = rows, rows / t
    return best

  def _take(self, capacity: int) -> BatchPlan[T]:
    slices, dest = [], 0
    most = self.config.max_batch_requests or capacity
    for prio in sorted(self._queues):
      q = self._queues[prio]
      while q and dest < capacity and len(slices) < most:
        p = q[0]
        n = min(p.remaining, capacity - dest)
        slices.append(Slice(p, p.taken, n, dest))
        p.taken += n
        dest += n
        self._unqueue(prio, n)
        if p.remaining == 0:
          q.popleft()
          self._requests -= 1
      if not q:
        del self._queues[prio]
      if dest == capacity or len(slices) == most:
        break
    return BatchPlan(self.config.bucket_for(dest), tuple(slices))


def expired_by_deadline(pending: Pending) -> bool:
  """Whether an expired request ran out of its own deadline (DEADLINE_EXCEEDED) rather than the
  queue-wait bound (shed: RESOURCE_EXHAUSTED)."""
  return pending.deadline is not None and pending.deadline == pending.expires

