"""Two-dimensional (batch x sequence) batching decisions in plain Python: no JAX, no tensors.

A request of sequence length L goes to the queue of the smallest sequence bucket S >= L,
so a 9-token query is never padded to the 200 tokens of an ad text queued beside it. Each
queue is an ordinary `Batcher` forming batch-bucket batches; the number of compiled shapes
equals len(batch buckets) x len(sequence buckets).

Which queue runs next: a queue is *ready* when it holds a full batch, when its oldest request
has waited `max_queue_delay_s`, or (with `dispatch_when_idle`) when the executor is idle.
Among ready queues the one whose next batch has the best (lowest) priority wins, ties broken
by the oldest waiting request. That is first-come first-served across queues at batch
granularity, so no queue starves: once a request is overdue its queue is ready, and only
queues holding an older request (finitely many, fewer with every batch) run before it. A ready
queue that holds for a fuller batch (a latency target's hold, slo.fill_wait_s) is passed over
until its hold ends, and the runner is told when that is.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Generic, Iterable, TypeVar

from bundle import check_seq_buckets, smallest_bucket
from serving.batching.admission import check_queue_bounds
from serving.batching.config import BatchingConfig
from serving.batching.rows import BatchPlan, Batcher, Decision, Pending

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class SeqBatchPlan(BatchPlan[T]):
  """A batch plan whose rows are all padded to sequence length `seq_bucket`."""

  seq_bucket: int = 0

  @property
  def grid_point(self) -> tuple[int, int]:
    return (self.bucket, self.seq_bucket)


class SeqBatcher(Generic[T]):
  """One `Batcher` per sequence bucket behind the `Batcher` interface the runner drives.

  `length_of(item)` is a queued item's sequence length. Not thread-safe (the runner
  locks). `config.max_queue_rows` and `max_queue_requests` bound all queues together.
  """

  def __init__(self, config: BatchingConfig, seq_buckets: Iterable[int],
               length_of: Callable[[T], int]):
    self.config = config
    self.seq_buckets = check_seq_buckets(seq_buckets)
    self.length_of = length_of
    # Sub-queues always release when asked: readiness is decided here, across queues.
    sub = dataclasses.replace(config, dispatch_when_idle=True)
    self._queues: dict[int, Batcher[T]] = {s: Batcher(sub) for s in self.seq_buckets}
    self._where: dict[int, int] = {}  # id(pending) -> its sequence bucket
    # (batch bucket, sequence bucket) of released batches not yet timed, oldest first.
    self._released: collections.deque[tuple[int, int]] = collections.deque(maxlen=8)

  @property
  def max_seq_len(self) -> int:
    return self.seq_buckets[-1]

  def seq_bucket_for(self, length: int) -> int:
    """Smallest sequence bucket holding `length` tokens; ValueError beyond the largest."""
    if length < 1:
      raise ValueError(f"sequence length must be >= 1, got {length}")
    bucket = smallest_bucket(self.seq_buckets, length)
    if bucket is None:
      raise ValueError(f"sequence length {length} exceeds the largest sequence bucket"
                       f" {self.seq_buckets[-1]}")
    return bucket

  @property
  def queued_rows(self) -> int:
    return sum(q.queued_rows for q in self._queues.values())

  @property
  def queued_requests(self) -> int:
    return sum(q.queued_requests for q in self._queues.values())

  def queue_rows(self) -> dict[int, int]:
    """Rows waiting per sequence bucket (for metrics and tests)."""
    return {s: q.queued_rows for s, q in self._queues.items()}

  def add(self, pending: Pending[T]) -> int:
    """Queues a request in its sequence bucket's queue; returns that bucket.

    Raises ValueError if its length fits no bucket, Admission if all queues together would
    exceed `max_queue_rows` or `max_queue_requests` (or its queue refuses it).
    """
    seq = self.seq_bucket_for(self.length_of(pending.item))
    check_queue_bounds(queued_rows=self.queued_rows, queued_requests=self.queued_requests,
                       rows=pending.rows, max_queue_rows=self.config.max_queue_rows,
                       max_queue_requests=self.config.max_queue_requests)
    self._queues[seq].add(pending)
    self._where[id(pending)] = seq
    return seq

  def seed(self, bucket: int, seq: int, seconds: float) -> None:
    """Records a batch time measured outside serving (the engine's warm-up) for one grid point."""
    self._queues[seq].observe(bucket, seconds)

  def observe(self, bucket: int, seconds: float) -> None:
    """Times a finished batch (runner order = release order) for its queue's wait estimate."""
    while self._released:
      b, seq = self._released.popleft()
      if b == bucket:  # entries skipped here were batches that failed (never timed)
        self._queues[seq].observe(bucket, seconds)
        return

  def remove(self, pendings: Iterable[Pending[T]]) -> None:
    """Drops requests (cancelled by their client) from their queues."""
    by_queue: dict[int, list[Pending[T]]] = {}
    for p in pendings:
      seq = self._where.pop(id(p), None)
      if seq is not None:
        by_queue.setdefault(seq, []).append(p)
    for seq, ps in by_queue.items():
      self._queues[seq].remove(ps)

  def drain(self) -> list[Pending[T]]:
    """Removes and returns everything queued, oldest first."""
    out = [p for q in self._queues.values() for p in q.drain()]
    self._where.clear()
    return sorted(out, key=lambda p: (p.priority, p.arrival))

  def _forget(self, pendings: Iterable[Pending[T]]) -> None:
    for p in pendings:
      self._where.pop(id(p), None)

  def decide(self, now: float, *, idle: bool) -> Decision[T]:
    """The next batch (a SeqBatchPlan) if one should run now, the expired requests, the wait."""
    cfg = self.config
    expired: list[Pending[T]] = []
    for q in self._queues.values():
      expired.extend(q.expire(now))
    self._forget(expired)
    ready, next_due = [], None
    for seq, q in self._queues.items():
      oldest = q.oldest_arrival()
      if oldest is None:
        continue
      due = oldest + cfg.max_queue_delay_s
      if (now >= due or q.queued_rows >= cfg.max_batch_size
          or (idle and cfg.dispatch_when_idle)):
        ready.append((q.head_priority(), oldest, seq))
      else:
        next_due = due if next_due is None else min(next_due, due)
    waits = [] if next_due is None else [next_due - now]
    # Best first; a queue that holds for a fuller batch (a latency target's hold) says how long,
    # and the next ready queue may run meanwhile.
    for *_, seq in sorted(ready):
      d = self._queues[seq].decide(now, idle=True)
      expired.extend(d.expired)
      self._forget(d.expired)
      if d.plan is None:
        if d.wait_s is not None:
          waits.append(d.wait_s)
        continue
      self._forget(s.pending for s in d.plan.slices if s.last)
      self._released.append((d.plan.bucket, seq))
      plan = SeqBatchPlan(d.plan.bucket, d.plan.slices, seq_bucket=seq)
      return Decision(plan, tuple(expired), 0.0)
    return Decision(None, tuple(expired), min(waits) if waits else None)
