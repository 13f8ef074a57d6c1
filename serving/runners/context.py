"""The row runner for context models: batches of candidates whose requests bring one context row.

A request has its context inputs ([1, ...]) and N candidate rows; the batcher counts candidates
(a request larger than the largest candidate bucket is split across batches, each slice taking
its request's context row along) and caps a batch at the largest request bucket. A batch is
the context rows of its slices padded to a request bucket, the candidate rows padded to a
candidate bucket, and the segment map from candidate rows to slices (`SEGMENT_INPUT`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bundle import numpy_dtype
from serving.batching import BatchingConfig, BatchPlan
from serving.engines import SEGMENT_INPUT, Engine
from serving.runners.base import Observer
from serving.runners.rows import ModelRunner
from serving.types import InferRequest


class ContextRunner(ModelRunner):
  """ModelRunner over a context engine: one context row per slice, the segment map per batch."""

  def __init__(self, name: str, engine: Engine, config: BatchingConfig, *,
               observer: Observer | None = None, instances: int | None = None,
               nan_policy: str = "pass"):
    if not engine.request_buckets:
      raise ValueError(f"{name}: a ContextRunner needs an engine with request buckets")
    most = engine.request_buckets[-1]
    if config.max_batch_requests is None or config.max_batch_requests > most:
      config = dataclasses.replace(config, max_batch_requests=most)
    super().__init__(name, engine, config, observer=observer, instances=instances,
                     nan_policy=nan_policy)
    context = set(engine.context_inputs)
    self._ctx_specs = [(t.name, t.shape[1:], numpy_dtype(t.dtype))
                       for t in engine.inputs if t.name in context]
    # ModelRunner._assemble_rows pads these (the candidate inputs) to the candidate bucket.
    self._in_specs = [s for s in self._in_specs if s[0] not in context]

  def _assemble(self, plan: BatchPlan[InferRequest]) -> dict[str, np.ndarray]:
    handed = self._handed(plan)
    batch = self._assemble_rows(plan, handed)
    requests = self.engine.request_bucket_for(len(plan.slices))
    for name, shape, dtype in self._ctx_specs:
      if handed and (on_device := self._on_device(
          [(i, 0, 1, s.pending.item.inputs[name]) for i, s in enumerate(plan.slices)],
          (requests, *shape), dtype)) is not None:
        batch[name] = on_device
        continue
      buf = np.zeros((requests, *shape), dtype)
      for i, s in enumerate(plan.slices):
        buf[i] = s.pending.item.inputs[name][0]
      batch[name] = buf
    segment = np.zeros(plan.bucket, np.int32)  # padding rows read request row 0: discarded
    for i, s in enumerate(plan.slices):
      segment[s.dest:s.dest + s.rows] = i
    batch[SEGMENT_INPUT] = segment
    return batch
