"""The C++ batch queue (serving/frontend/native/row_queue.h) as the runners see it.

`row_queue_factory(module)` makes each plain batched model's queue in C++: the native front
end then queues, admits and batches that model's requests without Python, and the runner takes
whole batches (serving/runners/queued.py). `NativeBatcher` puts the same C++ decisions behind
the Python `Batcher`'s interface, so the decision tests and a shared table of cases run against
both implementations.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

from bundle import TensorSpec, numpy_dtype
from serving.batching import Admission, BatchingConfig, BatchPlan, Decision, Pending, Slice

T = TypeVar("T")


def _specs(specs: Sequence[TensorSpec]) -> list[tuple[str, str, list[int], int]]:
  return [(t.name, t.datatype, list(t.shape), numpy_dtype(t.dtype).itemsize) for t in specs]


def row_queue_factory(native: Any) -> Callable[..., Any]:
  """A factory of C++ row queues from the compiled module (`load_extension()`)."""

  def make(*, name: str, config: BatchingConfig, inputs: Sequence[TensorSpec],
           outputs: Sequence[TensorSpec], instances: int, narrowed: Sequence[str] = ()) -> Any:
    """`narrowed`: 64-bit integer inputs whose values must fit 32 bits (checked at admission)."""
    return native.RowQueue(
        name=name, buckets=list(config.buckets), max_queue_delay_s=config.max_queue_delay_s,
        dispatch_when_idle=config.dispatch_when_idle, max_queue_rows=config.max_queue_rows,
        max_queue_requests=-1 if config.max_queue_requests is None else config.max_queue_requests,
        deadline_headroom=config.deadline_headroom, latency_slo_s=config.latency_slo_s or 0.0,
        max_queue_wait_s=config.max_queue_wait_s or 0.0, inputs=_specs(inputs),
        outputs=_specs(outputs), instances=instances, narrowed=list(narrowed))
  return make


class NativeBatcher(Generic[T]):
  """The C++ batching decisions behind `serving.batching.Batcher`'s interface."""

  def __init__(self, config: BatchingConfig, native: Any, executors: int = 1):
    self.config = config
    self._d = native.Decider(list(config.buckets), config.max_queue_delay_s,
                             config.dispatch_when_idle, config.max_queue_rows,
                             -1 if config.max_queue_requests is None
                             else config.max_queue_requests, config.deadline_headroom,
                             config.latency_slo_s or 0.0, config.max_queue_wait_s or 0.0,
                             executors)
    self._by_id: dict[int, Pending[T]] = {}
    self._id_of: dict[int, int] = {}  # id(pending) -> C++ entry id
    self._ids = itertools.count(1)

  def _forget(self, ids: Iterable[int]) -> tuple[Pending[T], ...]:
    out = []
    for i in ids:
      p = self._by_id.pop(i)
      del self._id_of[id(p)]
      out.append(p)
    return tuple(out)

  def add(self, pending: Pending[T]) -> None:
    i = next(self._ids)
    why = self._d.add(i, pending.rows, pending.arrival, pending.deadline, pending.priority)
    if why:
      raise Admission(why)
    self._by_id[i] = pending
    self._id_of[id(pending)] = i

  def observe(self, bucket: int, seconds: float) -> None:
    self._d.observe(bucket, seconds)

  def estimated_wait_s(self, rows: int, priority: int) -> float | None:
    return self._d.estimated_wait_s(rows, priority)

  @property
  def queued_rows(self) -> int:
    return self._d.queued_rows

  @property
  def queued_requests(self) -> int:
    return self._d.queued_requests

  def decide(self, now: float, *, idle: bool) -> Decision[T]:
    plan, expired, wait_s = self._d.decide(now, idle)
    expired_p = self._forget(expired)
    if plan is None:
      return Decision(None, expired_p, wait_s)
    bucket, slices = plan
    out = []
    for i, start, rows, dest in slices:
      p = self._by_id[i]
      p.taken = start + rows
      out.append(Slice(p, start, rows, dest))
      if p.remaining == 0:
        self._forget([i])
    return Decision(BatchPlan(bucket, tuple(out)), expired_p, wait_s)

  def expire(self, now: float) -> tuple[Pending[T], ...]:
    return self._forget(self._d.expire(now))

  def remove(self, pendings: Iterable[Pending[T]]) -> None:
    ids = [self._id_of[id(p)] for p in pendings if id(p) in self._id_of]
    self._d.remove(ids)
    self._forget(ids)

  def drain(self) -> list[Pending[T]]:
    return list(self._forget(self._d.drain()))

  def oldest_arrival(self) -> float | None:
    return self._d.oldest_arrival()

  def head_priority(self) -> int | None:
    return self._d.head_priority()
