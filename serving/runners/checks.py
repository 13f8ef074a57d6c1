"""What the row runners share before and after a batch: the instance count and buckets a runner
may run with, whether a model's tensors take the native fast path, the status a failed batch
gives its requests, and a finished batch's statistics."""

from __future__ import annotations

import time
from typing import Any, Sequence

from serving.batching import BatchingConfig, BatchPlan
from serving.engines import Engine
from serving.runners.base import RunnerStats
from serving.types import Code, ServingError


def as_serving_error(e: Exception, model: str) -> ServingError:
  """The status a failed batch gives its requests: the engine's own ServingError (e.g. a value
  it cannot take: INVALID_ARGUMENT), else INTERNAL."""
  if isinstance(e, ServingError):
    return e
  return ServingError(Code.INTERNAL, f"model {model} failed: {e}")


def refuse_out_of_range(engine: Engine, req: Any, observer: Any, stats: RunnerStats,
                        lock: Any) -> None:
  """At admission: INVALID_ARGUMENT (`Engine.check_ranges`) for a request holding a value a
  narrowed input cannot take, counted as a failed request (metrics, and `stats` under `lock`).
  Inside a batch it would fail the batch, and every request sharing it would be re-run alone:
  a few such requests a second cost the others most of the model's throughput."""
  try:
    engine.check_ranges(req.inputs)
  except ServingError as e:
    observer.request_done(ok=False, duration_s=time.perf_counter() - req.arrival, code=e.code)
    with lock:
      stats.fail_count += 1
    raise


def check_runner_config(name: str, engine: Engine, config: BatchingConfig,
                        instances: int | None) -> int:
  """The instance count to run (the engine's default when None); raises ValueError when it or
  the batching buckets do not fit the engine."""
  instances = engine.default_instances if instances is None else instances
  if instances < 1 or (engine.max_instances is not None and instances > engine.max_instances):
    raise ValueError(f"{name}: instance_count must be between 1 and"
                     f" {engine.max_instances or 'any number'} for this engine, got {instances}")
  if tuple(config.buckets) != tuple(engine.buckets):
    raise ValueError(f"{name}: batching buckets {config.buckets} differ from the engine's"
                     f" compiled buckets {engine.buckets}")
  return instances


def fixed_rows(tensors: Sequence[Any]) -> bool:
  """Whether every tensor is fixed-shape rows of a numeric dtype (the native fast path); a
  context input (leading dimension 1: one row per request) counts as fixed too."""
  return all(t.dtype != "object" and t.shape and (t.shape[0] == -1 or t.per_request)
             and all(d >= 0 for d in t.shape[1:]) for t in tensors)


def count_batch(st: RunnerStats, plan: BatchPlan, done: Sequence[tuple], error: ServingError | None,
                compute_s: float, t_input: float, t_done: float) -> list[float]:
  """Adds a finished batch and its answered requests to `st` (the caller holds its lock);
  returns the requests' queue times."""
  if error is None:
    st.execution_count += 1
    st.inference_count += plan.rows
    st.batch_counts[plan.bucket] = st.batch_counts.get(plan.bucket, 0) + 1
    st.compute_input_ns += int(t_input * 1e9)
    st.compute_infer_ns += int(compute_s * 1e9)
    st.last_inference_ms = int(time.time() * 1000)
  queue_s = []
  for req, _, err in done:
    dur = t_done - req.arrival
    queue_s.append(req.queue_ns / 1e9)
    if err is None:
      st.success_count += 1
      st.success_ns += int(dur * 1e9)
      st.queue_ns += req.queue_ns
    else:
      st.fail_count += 1
      st.fail_ns += int(dur * 1e9)
  return queue_s
