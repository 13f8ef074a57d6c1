"""Batching loop for sequence models: requests routed by length onto a (batch x sequence) grid.

`SeqRunner` is a `ModelRunner` (same public surface: submit/start/stop/stats/engine/
config/pending_requests, the same worker loop, pipelining and failure isolation) whose
queue is a `SeqBatcher`: one queue per sequence bucket, so a request is padded only to
its own bucket. Batches are assembled straight into [batch bucket, sequence bucket]
zero-filled buffers, and every output with a "seq" dimension is cut back to the request's
own length before it is delivered.

`make_runner` picks `SeqRunner` for engines with `seq_buckets`, `ModelRunner` otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from serving.batching import BatchingConfig, BatchPlan, SeqBatcher, SeqBatchPlan, Slice
from serving.engines import Engine, seq_axes
from serving.runners.base import Observer, Runner
from serving.runners.checks import fixed_rows
from serving.runners.context import ContextRunner
from serving.runners.queued import QueuedRowRunner, RowQueueFactory
from serving.runners.rows import ModelRunner
from serving.types import Code, InferRequest, ServingError


@dataclasses.dataclass(slots=True)
class SeqStats:
  """Tokens executed: `real_tokens` of requests, `padded_tokens` = sum of batch x seq buckets."""

  real_tokens: int = 0
  padded_tokens: int = 0
  grid_counts: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)

  @property
  def padding_ratio(self) -> float:
    """Padded tokens / real tokens (1.0 means no padding)."""
    return self.padded_tokens / self.real_tokens if self.real_tokens else 1.0


class SeqRunner(ModelRunner):
  """A ModelRunner for engines with `seq_buckets`; see the module docstring."""

  def __init__(self, name: str, engine: Engine, config: BatchingConfig, *,
               observer: Observer | None = None, instances: int | None = None):
    super().__init__(name, engine, config, observer=observer, instances=instances)
    self.seq_buckets: tuple[int, ...] = tuple(engine.seq_buckets)
    self._in_seq = seq_axes(engine.inputs)
    self._out_seq = seq_axes(engine.outputs)
    if not self._in_seq:
      raise ValueError(f"{name}: no input has a 'seq' dimension; use ModelRunner")
    self._batcher = SeqBatcher(config, self.seq_buckets, self.length_of)
    for (bucket, seq), seconds in engine.grid_seconds.items():
      self._batcher.seed(bucket, seq, seconds)
    self.seq_stats = SeqStats()
    # Batches are padded on the host; outputs cut to a request's length are host arrays.
    self.capabilities = dataclasses.replace(
        self.capabilities, device_inputs=None,
        device_outputs=None if self._out_seq else self.capabilities.device_outputs)

  def length_of(self, req: InferRequest) -> int:
    """A request's sequence length: the 'seq' dimension its inputs share."""
    name, axis = next(iter(self._in_seq.items()))
    return req.inputs[name].shape[axis]

  def check_lengths(self, req: InferRequest) -> int:
    """Returns the request's sequence length, or raises INVALID_ARGUMENT saying what is wrong."""
    lengths = {name: req.inputs[name].shape[axis] for name, axis in self._in_seq.items()}
    if len(set(lengths.values())) > 1:
      got = ", ".join(f"{k} has {v}" for k, v in lengths.items())
      raise ServingError(Code.INVALID_ARGUMENT, f"model {self.name}: inputs disagree on the"
                         f" sequence length ({got}); every 'seq' dimension of a request must"
                         " be the same")
    length = next(iter(lengths.values()))
    if length > self.seq_buckets[-1]:
      raise ServingError(Code.INVALID_ARGUMENT, f"model {self.name}: sequence length {length}"
                         f" exceeds the model's maximum of {self.seq_buckets[-1]}; truncate"
                         f" the inputs to {self.seq_buckets[-1]} tokens")
    if length < 1:
      raise ServingError(Code.INVALID_ARGUMENT, f"model {self.name}: sequence length must be"
                         " at least 1")
    return length

  def _record_started(self, reqs: Sequence[InferRequest]) -> None:
    super()._record_started(reqs)
    self.observer.request_lengths([self.length_of(r) for r in reqs])

  def submit(self, req: InferRequest) -> None:
    """Validates the sequence length (INVALID_ARGUMENT), then queues like ModelRunner."""
    self.check_lengths(req)
    super().submit(req)

  # -- worker thread ---------------------------------------------------------

  def _seq_bucket(self, plan: BatchPlan[InferRequest]) -> int:
    if isinstance(plan, SeqBatchPlan):  # plans rebuilt when isolating a failure are plain
      return plan.seq_bucket
    return self._batcher.seq_bucket_for(max(self.length_of(s.pending.item) for s in plan.slices))

  def _assemble(self, plan: BatchPlan[InferRequest]) -> dict[str, np.ndarray]:
    seq = self._seq_bucket(plan)
    st = self.seq_stats
    with self._stats_lock:
      st.real_tokens += sum(s.rows * self.length_of(s.pending.item) for s in plan.slices)
      st.padded_tokens += plan.bucket * seq
      st.grid_counts[(plan.bucket, seq)] = st.grid_counts.get((plan.bucket, seq), 0) + 1
    batch = {}
    for name, shape, dtype in self._in_specs:
      full = (plan.bucket, *(seq if n == -1 else n for n in shape))
      if len(plan.slices) == 1 and plan.padding == 0:
        s = plan.slices[0]
        src = s.pending.item.inputs[name][s.start:s.start + s.rows]
        if src.shape == full:
          batch[name] = src
          continue
      buf = np.zeros(full, dtype)
      for s in plan.slices:
        src = s.pending.item.inputs[name][s.start:s.start + s.rows]
        buf[(slice(s.dest, s.dest + s.rows), *(slice(0, n) for n in src.shape[1:]))] = src
      batch[name] = buf
    return batch

  def _trim(self, name: str, rows: np.ndarray, length: int) -> np.ndarray:
    axis = self._out_seq.get(name)
    if axis is None:
      return rows
    return rows[(slice(None),) * axis + (slice(0, length),)]

  def _scatter(self, s: Slice[InferRequest], outs: dict[str, np.ndarray] | None,
               device: Mapping[str, Any] | None = None) -> None:
    if not self._out_seq:
      super()._scatter(s, outs, device)
      return
    req = s.pending.item
    length = self.length_of(req)
    if s.start == 0 and s.last:
      req.outputs = {name: self._trim(name, outs[name][s.dest:s.dest + s.rows], length)
                     for name, _, _ in self._out_specs}
      return
    if req.outputs is None:
      req.outputs = {name: np.empty((req.rows, *(length if n == -1 else n for n in shape)), dtype)
                     for name, shape, dtype in self._out_specs}
    for name, _, _ in self._out_specs:
      req.outputs[name][s.start:s.start + s.rows] = self._trim(
          name, outs[name][s.dest:s.dest + s.rows], length)


def make_runner(name: str, engine: Engine, config: BatchingConfig, *,
                observer: Observer | None = None, instances: int | None = None,
                row_queue: RowQueueFactory | None = None, nan_policy: str = "pass") -> Runner:
  """SeqRunner for engines with sequence buckets; ContextRunner for context models; for plain fixed-shape rows, a QueuedRowRunner
  on a native batch queue when `row_queue` makes one; ModelRunner for the rest. `instances`
  batches at once (None: the engine's default). `nan_policy` "error" fails the requests of a
  row model whose outputs hold a NaN (sequence models pass NaN through)."""
  if engine.seq_buckets:
    return SeqRunner(name, engine, config, observer=observer, instances=instances)
  if engine.request_buckets:
    return ContextRunner(name, engine, config, observer=observer, instances=instances,
                         nan_policy=nan_policy)
  if row_queue is not None and fixed_rows((*engine.inputs, *engine.outputs)):
    return QueuedRowRunner(name, engine, config, queue_factory=row_queue, observer=observer,
                           instances=instances, nan_policy=nan_policy)
  return ModelRunner(name, engine, config, observer=observer, instances=instances,
                     nan_policy=nan_policy)
