"""A plain batched model served from a native batch queue: Python is entered once per batch.

The queue (serving/frontend/native/row_queue.h, made by the injected `queue_factory`) admits,
queues and plans batches in C++, and fills one reused staging buffer per input; the native gRPC
front end puts its requests straight into it, and `submit` puts the Python front ends' requests
into the same queue. Per instance, a dispatch thread takes a batch and starts it on the engine
(JAX dispatch is asynchronous), up to `depth` batches ahead, and a completion thread fetches
each batch's outputs and hands them back to the queue, which answers native requests in C++
and returns Python ones to be delivered here. At depth 1 (CPU) the dispatch thread completes
its own batch: it could not take the next one before, and the hand-off cost two wake-ups. Only the first instance runs partial batches (as
in ModelRunner); a failing batch is re-run request by request so only the poisoned one fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from bundle import numpy_dtype
from serving.batching import BatchingConfig
from serving.engines import Engine
from serving.runners.base import (BatchedRunner, Observer, RunnerCapabilities, RunnerStats, deliver,
                                  log_outcome, nan_error, request_log_enabled)
from serving.runners.checks import as_serving_error, check_runner_config
from serving.runners.handoff import DeviceRows
from serving.types import GRPC_STATUS, Code, InferRequest, ServingError, merge_generations

logger = logging.getLogger(__name__)

RowQueueFactory = Callable[..., Any]  # (name=, config=, inputs=, outputs=, instances=) -> queue
_CODE_OF = {v: k for k, v in GRPC_STATUS.items()}
METRICS_PERIOD_S = 0.05  # metrics taken from the queue by the runner, at most this often


class _Inline:
  """A dispatch loop's `done` queue at depth 1: completes each batch on the dispatching
  thread, which would only wait for it anyway (saves two thread wake-ups per batch)."""

  def __init__(self, name: str, complete: Callable[..., float]):
    self._name, self._complete, self._last_done = name, complete, 0.0

  def put(self, item: tuple | None) -> None:
    if item is not None:
      self._last_done = _guarded(self._name, self._complete, item, self._last_done)


def _guarded(name: str, complete: Callable[..., float], item: tuple, last_done: float) -> float:
  """Completes one batch; a bug in doing so is logged, and the thread goes on serving."""
  try:
    return complete(*item, last_done)
  except Exception:
    logger.exception("%s: completing a batch failed", name)
    return time.perf_counter()


class QueuedRowRunner(BatchedRunner):
  """Owns one engine and its native queue; thread-safe `submit`."""

  def __init__(self, name: str, engine: Engine, config: BatchingConfig, *,
               queue_factory: RowQueueFactory, observer: Observer | None = None,
               instances: int | None = None, depth: int | None = None,
               nan_policy: str = "pass"):
    instances = check_runner_config(name, engine, config, instances)
    self.name, self.engine, self.config = name, engine, config
    self.nan_check = nan_policy == "error"  # a request whose rows hold a NaN output fails
    self.inputs, self.outputs = tuple(engine.inputs), tuple(engine.outputs)
    self.observer = observer or Observer()
    self.depth = engine.pipeline_depth if depth is None else depth
    # A value out of a narrowed input's range is refused at admission (INVALID_ARGUMENT): in a
    # batch it would fail it, and every request in it would re-run alone.
    self._q = queue_factory(name=name, config=config, inputs=self.inputs, outputs=self.outputs,
                            instances=instances, narrowed=tuple(engine.narrowed_inputs))
    for bucket, seconds in engine.bucket_seconds.items():
      self._q.observe(bucket, seconds)
    self.observer.on_scrape(self._refresh_metrics, force=True)
    self.capabilities = RunnerCapabilities(instances=instances, fixed_rows=True, queue=self._q,
                                           device_outputs=engine.batch_device)
    self._in = [(t.name, numpy_dtype(t.dtype), tuple(t.shape[1:])) for t in self.inputs]
    self._out = [(t.name, tuple(t.shape[1:]), numpy_dtype(t.dtype)) for t in self.outputs]
    self._split_lock = threading.Lock()
    self._metrics_at, self._shed_seen = 0.0, 0
    self._metrics_lock = threading.Lock()
    self._threads = []
    for i in range(instances):
      suffix = f"#{i}" if instances > 1 else ""
      # One batch in flight: nothing to overlap, so no hand-off to a completion thread.
      done: Any = queue.SimpleQueue() if self.depth > 1 else _Inline(self.name, self._complete)
      self._threads.append(threading.Thread(target=self._dispatch_loop, args=(i, done),
                                            daemon=True, name=f"runner-{name}{suffix}"))
      if self.depth > 1:
        self._threads.append(threading.Thread(target=self._complete_loop, args=(done,),
                                              daemon=True, name=f"runner-{name}{suffix}-out"))

  @property
  def pending_requests(self) -> int:
    return self._q.pending()

  @property
  def stats(self) -> RunnerStats:
    """Triton's ModelStatistics counters, kept by the queue for every request it took."""
    st = self._q.stats()
    return RunnerStats(**{k: st[k] for k in (
        "success_count", "success_ns", "fail_count", "fail_ns", "queue_ns", "compute_input_ns",
        "compute_infer_ns", "inference_count", "execution_count", "last_inference_ms",
        "batch_counts", "expired", "rejected")})

  def submit(self, req: InferRequest) -> None:
    """Queues a request from a Python front end; raises ServingError if refused."""
    arrays = [np.ascontiguousarray(req.inputs[name], dtype) for name, dtype, _ in self._in]
    code, message = self._q.add(req, arrays, req.rows, req.arrival, req.deadline, req.priority)
    if code == 1:
      self._refresh_metrics(force=True)
      raise ServingError(Code.RESOURCE_EXHAUSTED, message)
    if code == 2:
      raise ServingError(Code.UNAVAILABLE, message)
    if code == 3:
      self.observer.requests_done(ok_s=(), failed=[(Code.INVALID_ARGUMENT,
                                                    time.perf_counter() - req.arrival)])
      raise ServingError(Code.INVALID_ARGUMENT, message)

  def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
    """Stops the loop; with `drain`, every queued request is answered first."""
    self._hand_back_failures(self._q.stop(drain))
    end = time.monotonic() + timeout
    for t in self._threads:
      if t.is_alive():
        t.join(max(0.0, end - time.monotonic()))
    self._refresh_metrics_guarded(force=True)

  # -- threads -------------------------------------------------------------------------------

  def _dispatch_loop(self, instance: int, done: queue.SimpleQueue) -> None:
    q, primary = self._q, instance == 0
    while True:
      try:
        batch, expired, native_failed, held, logs = q.next(instance, primary, self.depth, 0.5,
                                                           request_log_enabled())
      except Exception:  # a bug must not stop the model: log it and keep serving
        logger.exception("%s: taking a batch failed", self.name)
        time.sleep(0.01)
        continue
      try:
        self._count_native_failures(native_failed)
        self._log(logs)
      finally:
        if held:  # expired native requests: answered once counted
          q.release(held)
      if expired:
        self._hand_back_failures(expired)
      if batch is None:
        if q.finished(instance):
          break
        self._refresh_metrics_guarded()  # idle: the last batches' metrics are taken too
        continue
      t0 = time.perf_counter()
      try:
        inputs = self._inputs(batch)
        t1 = time.perf_counter()
        handle = self.engine.dispatch(bucket=batch.bucket, inputs=inputs, **(
            {"rows": batch.rows} if self.engine.wants_rows else {}))
      except ServingError as e:  # a value the engine refuses: the completion thread isolates it
        done.put((batch, e, 0.0, 0.0))
        continue
      except Exception as e:  # a failing batch fails its requests, not the server
        logger.exception("%s: dispatch failed", self.name)
        self._fail(batch, ServingError(Code.INTERNAL,
                                       f"model {self.name} failed to start a batch: {e}"))
        continue
      done.put((batch, handle, t1, t1 - t0))
    done.put(None)

  def _complete_loop(self, done: queue.SimpleQueue) -> None:
    last_done = 0.0
    while (item := done.get()) is not None:
      last_done = _guarded(self.name, self._complete, item, last_done)

  def _complete(self, batch: Any, handle: Any, t_dispatch: float, t_input: float,
                last_done: float) -> float:
    """Fetches one dispatched batch's outputs and answers its requests; returns when it was
    done (the next batch's busy time counts from then)."""
    if isinstance(handle, ServingError):  # refused at dispatch: only its requests fail
      self._isolate(batch, handle)
      return time.perf_counter()
    try:
      outs = self.engine.fetch(handle)
    except Exception as e:
      logger.exception("%s: batch of %d rows failed", self.name, batch.rows)
      self._isolate(batch, as_serving_error(e, self.name))
      return time.perf_counter()
    if self.nan_check and (err := nan_error(self.name, outs, batch.rows)):
      self._isolate(batch, err)  # only the requests whose own rows hold the NaN fail
      return time.perf_counter()
    t_done = time.perf_counter()
    busy_s = t_done - max(t_dispatch, last_done)  # pipelined: time since the last batch
    self._answer(batch, outs, busy_s, t_done - t_dispatch, t_input,
                 self.engine.generation_of(handle), t_dispatch=t_dispatch, handle=handle)
    try:
      self.observer.batch_timing(start=t_dispatch, done=t_done, rows=batch.rows,
                                 requests=len(batch.request_rows), assembly_s=t_input,
                                 encode_s=time.perf_counter() - t_done)
    except Exception:  # metrics never fail answers nor stop the model
      logger.exception("%s: recording a batch's timing failed", self.name)
    return t_done

  def _inputs(self, batch: Any) -> dict[str, np.ndarray]:
    """The batch's inputs: typed views of its staging buffers (bytes [bucket, row bytes])."""
    raw = batch.inputs
    return {name: raw[name].view(dtype).reshape((batch.bucket, *shape))
            for name, dtype, shape in self._in}

  # -- answers -------------------------------------------------------------------------------

  def _answer(self, batch: Any, outs: dict[str, np.ndarray], busy_s: float, compute_s: float,
              t_input: float, generation: int = 0, *, t_dispatch: float | None = None,
              handle: Any = None) -> None:
    try:
      arrays = [np.ascontiguousarray(outs[name], dtype).reshape(-1).view(np.uint8)
                for name, _, dtype in self._out]
      # The queue records the batch's metrics, then sends its native answers.
      backs, t_sent, logs = self._q.complete(batch, arrays, busy_s, compute_s, t_input,
                                             request_log_enabled(), generation)
    except Exception as e:  # a missing or malformed output fails the batch
      logger.exception("%s: answering a batch of %d rows failed", self.name, batch.rows)
      self._fail(batch, ServingError(Code.INTERNAL, f"model {self.name} failed: {e}"))
      return
    try:  # logs and metrics never fail answers (the Python requests' are delivered below)
      self._log(logs)
      self._refresh_metrics()
    except Exception:
      logger.exception("%s: recording a batch's logs or metrics failed", self.name)
    if t_dispatch is not None and self.observer.tracing:
      try:
        self._trace(batch, backs, t_dispatch - t_input, t_dispatch, t_dispatch + compute_s,
                    t_sent)
      except Exception:
        logger.exception("%s: tracing a batch failed", self.name)
    if backs:
      self._deliver_slices(backs, outs, generation, handle)

  def _trace(self, batch: Any, backs: Sequence[tuple], t_taken: float, t_dispatch: float,
             t_done: float, t_sent: float) -> None:
    """The batch span of the traced requests in it: Python ones (`req.trace`) and native ones
    the queue answered (their records, sent at `t_sent`)."""
    traced = [b[0] for b in backs if b[0].trace is not None]
    natives = self._q.traced(batch)
    if traced or natives:
      self.observer.traced_batch(bucket=batch.bucket, rows=batch.rows, requests=traced,
                                 t_taken=t_taken, t_dispatch=t_dispatch, t_done=t_done,
                                 natives=natives, t_sent=t_sent)

  def _deliver_slices(self, backs: Sequence[tuple], outs: dict[str, np.ndarray],
                      generation: int = 0, handle: Any = None) -> None:
    """Python requests: copies each slice's rows of the batch outputs into its request (views
    of the device outputs, taken from the batch's `handle`, for a whole request that keeps
    them there)."""
    done, device = [], None
    for req, start, rows, dest, _ in backs:
      if start == 0 and rows == req.rows:  # whole
        req.generations = (generation, generation)
        if (req.device_outputs and device is None and handle is not None
            and self.capabilities.device_outputs is not None):
          device = self.engine.device_outputs(handle)  # once per batch, only when asked for
        req.outputs = ({name: DeviceRows.of(device[name], dest, rows) for name, _, _ in self._out}
                       if device is not None and req.device_outputs else
                       {name: outs[name][dest:dest + rows] for name, _, _ in self._out})
      else:
        with self._split_lock:  # slices of one request may finish on other instances
          merge_generations(req, generation, first=req.outputs is None)
          if req.outputs is None:
            req.outputs = {name: np.empty((req.rows, *shape), dtype)
                           for name, shape, dtype in self._out}
          for name, _, _ in self._out:
            req.outputs[name][start:start + rows] = outs[name][dest:dest + rows]
          # Delivered once every slice is copied, not when the queue counted the last one done:
          # the slice the queue finished first may still be copying on another instance.
          req.rows_done += rows
          if req.rows_done < req.rows:
            continue
      done.append((req, req.outputs, None))
    deliver(done)

  def _fail(self, batch: Any, err: ServingError) -> None:
    backs, native_failed, held, logs = self._q.fail(batch, GRPC_STATUS[err.code], err.message,
                                                    request_log_enabled(err))
    try:
      self._count_native_failures(native_failed)
      self._log(logs)
    finally:
      if held:
        self._q.release(held)
    self._hand_back_failures(backs)

  def _log(self, logs: Sequence[tuple[str, int, str, float]]) -> None:
    """The request log's records of native requests (gathered only while it is enabled)."""
    model, _, version = self.name.rpartition("/")
    for request_id, code, message, arrival in logs:
      err = None if code == 0 else ServingError(_CODE_OF.get(code, Code.INTERNAL), message)
      log_outcome(model or self.name, version, request_id, err, arrival)

  def _count_native_failures(self, failed: Sequence[tuple[int, float]]) -> None:
    """Metrics for native requests the queue failed (answered in C++)."""
    if failed:
      self.observer.requests_done(ok_s=(), failed=[(_CODE_OF.get(c, Code.INTERNAL), s)
                                                   for c, s in failed])

  def _isolate(self, batch: Any, err: ServingError) -> None:
    """Re-runs each request's slice of a failed batch alone, so only the poisoned one fails."""
    if batch.requests == 1:
      self._fail(batch, err)
      return
    for single in self._q.isolate(batch):
      t0 = time.perf_counter()
      try:
        handle = self.engine.dispatch(bucket=single.bucket, inputs=self._inputs(single), **(
            {"rows": single.rows} if self.engine.wants_rows else {}))
        outs = self.engine.fetch(handle)
      except Exception as e:
        self._fail(single, as_serving_error(e, self.name))
        continue
      if self.nan_check and (err := nan_error(self.name, outs, single.rows)):
        self._fail(single, err)
        continue
      t = time.perf_counter() - t0
      self._answer(single, outs, 0.0, t, 0.0, self.engine.generation_of(handle), t_dispatch=t0)

  def _hand_back_failures(self, backs: Sequence[tuple]) -> None:
    """Python requests the queue failed (expired, unloaded, failed batch): their sinks."""
    if not backs:
      return
    now = time.perf_counter()
    done = []
    for req, code, message in backs:
      err = ServingError(_CODE_OF.get(code, Code.INTERNAL), message)
      req.failed = True
      done.append((req, None, err))
    self.observer.requests_done(ok_s=(), failed=[(e.code, now - r.arrival) for r, _, e in done])
    deliver(done)

  def _refresh_metrics_guarded(self, *, force: bool = False) -> None:
    """`_refresh_metrics` where a failure must not stop anything: logged."""
    try:
      self._refresh_metrics(force=force)
    except Exception:
      logger.exception("%s: recording metrics failed", self.name)

  def _refresh_metrics(self, *, force: bool = False) -> None:
    """Hands what the queue recorded (batches run, requests answered, request sizes, requests
    shed at the door, queue depth) to the observer: from the runner threads at most every
    METRICS_PERIOD_S, and before each metrics scrape, so a scrape counts every request
    already answered. No metrics work per batch."""
    now = time.perf_counter()
    if not force and now - self._metrics_at < METRICS_PERIOD_S:
      return
    # Recorded under the lock too: a scrape racing a runner's refresh waits for what that one
    # took, instead of finding the queue emptied and the counters not yet raised.
    with self._metrics_lock:
      self._metrics_at = now
      st = self._q.stats()
      self.observer.queue_depth(st["queued_rows"], st["queued_requests"])
      shed, self._shed_seen = st["rejected"] - self._shed_seen, st["rejected"]
      m = self._q.take_metrics()
      if shed > 0:
        self.observer.shed(shed)
      if m["request_rows"]:
        self.observer.request_sizes(m["request_rows"])
      if m["buckets"]:
        self.observer.batches(buckets=m["buckets"], rows=m["rows"], compute_s=m["compute_s"],
                              queue_s=m["queue_s"])
      if m["ok_s"]:
        self.observer.requests_done(ok_s=m["ok_s"])
      self._count_native_failures(m["failed"])
