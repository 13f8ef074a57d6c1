"""Per-model batching loop: queue -> Batcher decision -> padded batch -> engine -> split outputs.

One worker thread per instance (Triton's instance_group count) of a served model version, all
fed by one queue. While batch n runs on the device (JAX dispatch is asynchronous), a worker
builds batch n+1 on the host; it then waits for batch n, copies each request's rows out, and
hands completions back in one call per batch (`deliver`), so an asyncio servicer pays one
wake-up per batch, not per request. The first instance runs partial batches as the batcher
decides; the others take full batches only, so under load a second batch runs while the first
does (on CPU, on the cores XLA's threads leave idle) while a light load keeps one batch at a time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np

from bundle import numpy_dtype
from serving.batching import (Admission, BatchingConfig, BatchPlan, Batcher, Pending, Slice,
                              expired_by_deadline, shed_message)
from serving.engines import Engine
from serving.runners.base import (BatchedRunner, Observer, RunnerCapabilities, RunnerStats, deliver,
                                  nan_error)
from serving.runners.checks import (as_serving_error, check_runner_config, count_batch,
                                    fixed_rows, refuse_out_of_range)
from serving.runners.handoff import DeviceRows, assemble
from serving.runners.open_requests import OpenRequests
from serving.types import Code, InferRequest, ServingError, merge_generations

logger = logging.getLogger(__name__)


class ModelRunner(BatchedRunner):
  """Owns one engine and its queue; thread-safe `submit`, one worker thread per instance."""

  def __init__(self, name: str, engine: Engine, config: BatchingConfig, *,
               observer: Observer | None = None, instances: int | None = None,
               nan_policy: str = "pass"):
    instances = check_runner_config(name, engine, config, instances)
    self.name = name
    self.nan_check = nan_policy == "error"  # a request whose rows hold a NaN output fails
    self.engine = engine
    self.config = config
    self.inputs, self.outputs = tuple(engine.inputs), tuple(engine.outputs)
    self.capabilities = RunnerCapabilities(instances=instances,
                                           fixed_rows=fixed_rows((*self.inputs, *self.outputs)),
                                           device_inputs=engine.batch_device,
                                           device_outputs=engine.batch_device)
    self.observer = observer or Observer()
    self.stats = RunnerStats()
    self._stats_lock = threading.Lock()  # instances finish batches concurrently
    self._split_lock = threading.Lock()  # outputs of requests split across batches
    self._batcher: Batcher[InferRequest] = Batcher(config, executors=instances)
    for bucket, seconds in engine.bucket_seconds.items():
      self._batcher.observe(bucket, seconds)
    lock = threading.RLock()
    self._cv = threading.Condition(lock)  # the primary instance waits on this one
    self._cv_full = threading.Condition(lock)  # the others: only a full batch wakes them
    self._stopping = False
    self._inflight = 0
    self._open: OpenRequests[InferRequest] = OpenRequests()  # each answered exactly once
    self._threads = [threading.Thread(target=self._loop, args=(i == 0,), daemon=True,
                                      name=f"runner-{name}" + (f"#{i}" if instances > 1 else ""))
                     for i in range(instances)]
    self._out_specs = [(t.name, t.shape[1:], numpy_dtype(t.dtype)) for t in engine.outputs]
    self._in_specs = [(t.name, t.shape[1:], numpy_dtype(t.dtype)) for t in engine.inputs]

  @property
  def pending_requests(self) -> int:
    with self._cv:
      return self._batcher.queued_requests + self._inflight

  def submit(self, req: InferRequest) -> None:
    """Queues a request; raises ServingError(RESOURCE_EXHAUSTED/UNAVAILABLE) if refused."""
    refuse_out_of_range(self.engine, req, self.observer, self.stats, self._stats_lock)
    with self._cv:
      if self._stopping:
        raise ServingError(Code.UNAVAILABLE, f"model {self.name} is shutting down; retry on"
                           " another replica")
      try:
        pending = Pending(req, req.rows, req.arrival, req.deadline, req.priority)
        self._batcher.add(pending)
      except Admission as e:
        with self._stats_lock:
          self.stats.rejected += 1
          self.stats.fail_count += 1  # Triton counts rejected requests as failures
        self.observer.shed()
        raise ServingError(Code.RESOURCE_EXHAUSTED, f"model {self.name}: {e}") from None
      self._open.accepted(pending)
      self.observer.queue_depth(self._batcher.queued_rows, self._batcher.queued_requests)
      self._cv.notify()
      if self._batcher.queued_rows >= self.config.max_batch_size:
        self._cv_full.notify()

  def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
    """Stops the loop; with `drain`, every queued request is answered first."""
    with self._cv:
      self._stopping = True
      if not drain:
        dropped = self._batcher.drain()
        self._fail([p.item for p in dropped], ServingError(
            Code.UNAVAILABLE, f"model {self.name} was unloaded before this request ran; retry"))
      self._cv.notify_all()
      self._cv_full.notify_all()
    end = time.monotonic() + timeout
    for t in self._threads:
      if t.is_alive():
        t.join(max(0.0, end - time.monotonic()))

  # -- worker thread ---------------------------------------------------------

  def _fail(self, reqs: Sequence[InferRequest], err: ServingError) -> None:
    reqs = self._open.close(reqs)
    if not reqs:
      return
    now = time.perf_counter()
    with self._stats_lock:
      self.stats.fail_count += len(reqs)
      self.stats.fail_ns += sum(int((now - r.arrival) * 1e9) for r in reqs)
    try:
      for r in reqs:
        self.observer.request_done(ok=False, duration_s=now - r.arrival, code=err.code)
    except Exception:  # closed above: they are answered below whatever the metrics do
      logger.exception("%s: recording failed requests' metrics failed", self.name)
    deliver([(r, None, err) for r in reqs])

  def _next_plan(self, idle: bool, primary: bool) -> BatchPlan[InferRequest] | None:
    """Blocks until a batch should run (None: finish the in-flight one first). Only the primary
    instance runs partial batches; the others take full ones: throughput under load, but a
    trickle is never split into concurrent small batches (on CPU they share the cores)."""
    with self._cv:
      while True:
        now = time.perf_counter()
        d = self._batcher.decide(now, idle=idle and primary)
        if d.expired:
          with self._stats_lock:
            self.stats.expired += len(d.expired)
          late = [p.item for p in d.expired if expired_by_deadline(p)]
          shed = [p.item for p in d.expired if not expired_by_deadline(p)]
          self._fail(late, ServingError(
              Code.DEADLINE_EXCEEDED, f"model {self.name}: deadline passed while queued"
              " (never executed); raise the deadline or reduce load"))
          if shed:  # only a queue-wait bound sheds: without one there is no message to give
            self._fail(shed, ServingError(Code.RESOURCE_EXHAUSTED,
                                          shed_message(self.name, self.config)))
          self.observer.queue_depth(self._batcher.queued_rows, self._batcher.queued_requests)
        if d.plan is not None:
          self._inflight += sum(1 for s in d.plan.slices if s.start == 0)
          return d.plan
        if not idle:
          return None  # go finish the batch in flight; it frees the device
        if self._stopping and (self._batcher.queued_rows == 0 or not primary):
          return None  # the primary drains what is left
        if primary:
          self._cv.wait(d.wait_s)
        else:
          self._cv_full.wait()

  def _record_started(self, reqs: Sequence[InferRequest]) -> None:
    """The traffic record bucket plans learn from: rows of each request as it starts."""
    self.observer.request_sizes([r.rows for r in reqs])

  def _assemble(self, plan: BatchPlan[InferRequest]) -> dict[str, np.ndarray]:
    return self._assemble_rows(plan, self._handed(plan))

  def _assemble_rows(self, plan: BatchPlan[InferRequest], handed: bool) -> dict[str, np.ndarray]:
    """The batch's row inputs, padded to its bucket; on the device where `handed`."""
    batch = {}
    for name, shape, dtype in self._in_specs:
      if handed and (on_device := self._on_device(
          [(s.dest, s.start, s.rows, s.pending.item.inputs[name]) for s in plan.slices],
          (plan.bucket, *shape), dtype)) is not None:
        batch[name] = on_device
        continue
      if len(plan.slices) == 1 and plan.padding == 0:
        s = plan.slices[0]
        batch[name] = s.pending.item.inputs[name][s.start:s.start + s.rows]
        continue
      buf = np.zeros((plan.bucket, *shape), dtype)
      for s in plan.slices:
        buf[s.dest:s.dest + s.rows] = s.pending.item.inputs[name][s.start:s.start + s.rows]
      batch[name] = buf
    return batch

  def _handed(self, plan: BatchPlan[InferRequest]) -> bool:
    """Whether a request of the batch brings device rows (a pipeline hand-off) this runner
    assembles on its device; checked once per batch."""
    return self.capabilities.device_inputs is not None and any(
        isinstance(v, DeviceRows) for s in plan.slices for v in s.pending.item.inputs.values())

  def _on_device(self, pieces: Sequence[tuple[int, int, int, Any]], shape: tuple[int, ...],
                 dtype: Any) -> Any:
    """A batch input assembled on the device from device rows (serving/runners/handoff.py), or
    None: none among `pieces`, or their copy is not compiled yet; the caller uses the host."""
    return assemble(pieces, shape, dtype, self.capabilities.device_inputs)

  def _outputs(self, plan: BatchPlan[InferRequest],
               handle: Any) -> tuple[dict[str, np.ndarray] | None, Mapping[str, Any] | None]:
    """(host outputs, device outputs): the device ones when a request keeps its outputs there;
    the host ones are not fetched when every request does (and NaNs are not checked)."""
    if self.capabilities.device_outputs is None:
      return self.engine.fetch(handle), None
    keep = [s.pending.item.device_outputs and s.start == 0 and s.last for s in plan.slices]
    dev = self.engine.device_outputs(handle) if any(keep) else None
    if dev is not None and all(keep) and not self.nan_check:
      import jax
      return None, jax.block_until_ready(dev)
    return self.engine.fetch(handle), dev

  def _finish(self, plan: BatchPlan[InferRequest], handle: Any, t_dispatch: float,
              t_input: float, last_done: float) -> float:
    """Waits for a batch and delivers it; returns when it finished (this worker's clock for the
    next batch's busy time)."""
    try:
      outs, dev = self._outputs(plan, handle)
    except Exception as e:  # a failing batch fails its requests, not the server
      logger.exception("%s: batch of %d rows failed", self.name, plan.rows, extra={
          "model": self.name, "request_ids": [s.pending.item.request_id for s in plan.slices]})
      self._isolate(plan, as_serving_error(e, self.name))
      return time.perf_counter()
    if self.nan_check and (err := nan_error(self.name, outs, plan.rows)):
      self._isolate(plan, err)  # only the requests whose own rows hold the NaN fail
      return time.perf_counter()
    t_done = time.perf_counter()
    busy_s = t_done - max(t_dispatch, last_done)  # pipelined: time since this worker's last batch
    with self._cv:
      self._batcher.observe(plan.bucket, busy_s)
    self._complete(plan, outs, None, time.perf_counter() - t_dispatch, t_input,
                   self.engine.generation_of(handle), t_dispatch=t_dispatch, device=dev)
    self.observer.batch_timing(start=t_dispatch, done=t_done, rows=plan.rows,
                               requests=len(plan.slices), assembly_s=t_input,
                               encode_s=time.perf_counter() - t_done)
    return t_done

  def _isolate(self, plan: BatchPlan[InferRequest], error: ServingError) -> None:
    """Re-runs each request's slice of a failed batch alone, so only the poisoned one fails."""
    if len(plan.slices) == 1:
      self._complete(plan, None, error, 0.0, 0.0)
      return
    for s in plan.slices:
      if s.pending.item.failed:
        continue
      single = BatchPlan(self.config.bucket_for(s.rows), (Slice(s.pending, s.start, s.rows, 0),))
      t0 = time.perf_counter()
      try:
        outs = self.engine.fetch(self.engine.dispatch(bucket=single.bucket,
                                                      inputs=self._assemble(single), **(
            {"rows": s.rows} if self.engine.wants_rows else {})))
        err = nan_error(self.name, outs, s.rows) if self.nan_check else None
        self._complete(single, None if err else outs, err, time.perf_counter() - t0, 0.0)
      except Exception as e:
        self._complete(single, None, as_serving_error(e, self.name), time.perf_counter() - t0,
                       0.0)

  def _scatter(self, s: Slice[InferRequest], outs: dict[str, np.ndarray] | None,
               device: Mapping[str, Any] | None = None) -> None:
    """Copies slice `s`'s rows of the batch outputs into its request's outputs (views of the
    device outputs for a whole request that keeps them there)."""
    req = s.pending.item
    if device is not None and req.device_outputs and s.start == 0 and s.last:
      req.outputs = {name: DeviceRows.of(device[name], s.dest, s.rows)
                     for name, _, _ in self._out_specs}
      return
    if s.start == 0 and s.last:
      req.outputs = {name: outs[name][s.dest:s.dest + s.rows] for name, _, _ in self._out_specs}
      return
    if req.outputs is None:
      req.outputs = {name: np.empty((req.rows, *shape), dtype)
                     for name, shape, dtype in self._out_specs}
    for name, _, _ in self._out_specs:
      req.outputs[name][s.start:s.start + s.rows] = outs[name][s.dest:s.dest + s.rows]

  def _complete(self, plan: BatchPlan[InferRequest], outs: dict[str, np.ndarray] | None,
                error: ServingError | None, compute_s: float, t_input: float,
                generation: int = 0, *, t_dispatch: float | None = None,
                device: Mapping[str, Any] | None = None) -> None:
    """Copies each request's rows out of the batch outputs (or fails them) and delivers;
    with `t_dispatch` (a whole batch's), traced requests in it get their batch span first."""
    t_done = time.perf_counter()
    done: list = []
    for s in plan.slices:
      req = s.pending.item
      # A split request's slices may finish in other instances, in any order; a whole one is
      # this batch's alone.
      with contextlib.nullcontext() if s.start == 0 and s.last else self._split_lock:
        if req.failed:
          continue
        if error is not None:
          req.failed = True
          req.outputs = None
          done.append((req, None, error))
          continue
        merge_generations(req, generation, first=req.rows_done == 0)
        self._scatter(s, outs, device)
        req.compute_ns += int(compute_s * 1e9)
        req.rows_done += s.rows
        if req.rows_done == req.rows:
          done.append((req, req.outputs, None))
    with self._stats_lock:
      queue_s = count_batch(self.stats, plan, done, error, compute_s, t_input, t_done)
    try:  # metrics before the answers (a client may read them next), but never fail them
      self._observe(plan, done, error, queue_s, compute_s, t_input, t_done, t_dispatch)
    except Exception:
      logger.exception("%s: recording a batch's metrics failed", self.name)
    with self._cv:
      self._inflight -= len(done)
    done = self._open.close(done, lambda c: c[0])
    if done:
      deliver(done)

  def _observe(self, plan: BatchPlan[InferRequest], done: list, error: ServingError | None,
               queue_s: list[float], compute_s: float, t_input: float, t_done: float,
               t_dispatch: float | None) -> None:
    for req, _, err in done:
      self.observer.request_done(ok=err is None, duration_s=t_done - req.arrival,
                                 code=None if err is None else err.code)
    if error is None:
      self.observer.batch(bucket=plan.bucket, rows=plan.rows, queue_s=queue_s,
                          compute_s=compute_s)
    if t_dispatch is not None and self.observer.tracing:
      traced = [s.pending.item for s in plan.slices if s.pending.item.trace is not None]
      if traced:
        self.observer.traced_batch(bucket=plan.bucket, rows=plan.rows, requests=traced,
                                   t_taken=t_dispatch - t_input, t_dispatch=t_dispatch,
                                   t_done=t_done)

  def _loop(self, primary: bool) -> None:
    inflight, last_done = None, 0.0
    while True:
      try:
        plan = self._next_plan(idle=inflight is None, primary=primary)
      except Exception as e:  # a bug must not stop the model: fail what it left, keep serving
        self._decision_failed(e)
        if inflight is None:
          continue
        plan = None
      if plan is None and inflight is None:
        return  # stopping and drained
      if plan is not None:
        t0 = time.perf_counter()
        for s in plan.slices:
          if s.start == 0:
            s.pending.item.queue_ns = int((t0 - s.pending.item.arrival) * 1e9)
        try:
          self._record_started([s.pending.item for s in plan.slices if s.start == 0])
          self.observer.queue_depth(self._batcher.queued_rows, self._batcher.queued_requests)
          batch = self._assemble(plan)
          t1 = time.perf_counter()
          handle = self.engine.dispatch(bucket=plan.bucket, inputs=batch, **(
              {"rows": plan.rows} if self.engine.wants_rows else {}))
          started = (plan, handle, t1, t1 - t0)
        except ServingError as e:  # a value the engine refuses (an id out of range): re-run
          self._isolate(plan, e)   # request by request, so only the request holding it fails
          started = None
        except Exception as e:
          logger.exception("%s: dispatch failed", self.name)
          self._abandon([s.pending for s in plan.slices], ServingError(
              Code.INTERNAL, f"model {self.name} failed to start a batch: {e}"))
          started = None
      else:
        started = None
      if inflight is not None:
        try:
          last_done = self._finish(*inflight, last_done)
        except Exception as e:
          logger.exception("%s: answering a batch failed", self.name)
          self._abandon([s.pending for s in inflight[0].slices], ServingError(
              Code.INTERNAL, f"model {self.name} failed answering a batch: {e}"))
      inflight = started

  def _decision_failed(self, e: Exception) -> None:
    """A batching decision raised: fails every accepted request with rows still unplaced
    (queued, or taken out by the decision that raised) rather than leaving it unanswered."""
    logger.exception("%s: a batching decision failed", self.name)
    with self._cv:  # with the queue: a request submitted meanwhile is queued and open, or neither
      self._batcher.drain()
      left = self._open.unfinished()
    self._abandon(left, ServingError(
        Code.INTERNAL, f"model {self.name}: batching failed ({e}); the request did not run:"
        " retry, and report the server log's traceback"))
    time.sleep(0.01)  # a decision that keeps failing must not spin

  def _abandon(self, pendings: Sequence[Pending[InferRequest]], err: ServingError) -> None:
    """Fails the still-open requests among `pendings`; an in-flight slice of one is dropped
    when its batch completes (failed requests are skipped there)."""
    with self._split_lock:
      pendings = self._open.among(pendings)
      for p in pendings:
        p.item.failed = True
    with self._cv:
      self._inflight -= sum(1 for p in pendings if p.taken > 0)  # counted when they started
    self._fail([p.item for p in pendings], err)
