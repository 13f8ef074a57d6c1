"""The pipeline runner: a request runs its steps in order, each model step through that model's
own runner (so concurrent pipeline requests batch together at every step), each op step on the
host (serving/runners/pipeline_ops.py). Tensors pass between steps as arrays, never encoded;
from a model step to a later one they stay on the device where the spec's `handoff` says so
(serving/runners/handoff.py; the copies compile in the background: pipeline_warm.py).

A step's answer arrives on the step runner's delivery thread, which runs the following op steps
and submits the next model step; a failed step fails that request only, with the step named.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from bundle import Manifest, Source, Step, TensorSpec, numpy_dtype
from serving.batching import BatchingConfig
from serving.runners.base import Observer, Runner, RunnerCapabilities, RunnerStats, deliver
from serving.runners.handoff import DeviceRows
from serving.runners.pipeline_ops import OPS
from serving.runners.pipeline_warm import Edges, HandoffWarmer, Warming
from serving.types import Code, Completion, InferRequest, ServingError

# (model name, version or None) -> that model's READY runner; raises ServingError if none.
ModelLookup = Callable[[str, "int | None"], Runner]


@dataclasses.dataclass(slots=True)
class StepStats:
  """Per step: answers, failures and their total time (submit to answer, or op run time)."""

  count: int = 0
  fail: int = 0
  ns: int = 0


@dataclasses.dataclass(slots=True, eq=False)
class _Run:
  """One pipeline request in flight: its tensors so far and the next step."""

  req: InferRequest
  tensors: dict[str, np.ndarray]
  step: int = 0
  t_step: float = 0.0


def _native_shapes(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
  """Whether the native front end can take the pipeline's requests: every tensor one row per
  request with fixed dimensions, numeric or (inputs only) BYTES, so it answers them in C++."""
  return all(t.per_request and all(d >= 0 for d in t.shape[1:])
             and (t.dtype != "object" or t in inputs) for t in (*inputs, *outputs))


class PipelineRunner:
  """Runs a manifest's `PipelineSpec` over the served models `models` looks up."""

  def __init__(self, name: str, manifest: Manifest, models: ModelLookup, *,
               observer: Observer | None = None, warming: Warming | None = None):
    if manifest.pipeline is None:
      raise ValueError(f"{name}: not a pipeline manifest")
    sig = next(iter(manifest.signatures.values()))
    self.name, self.models, self.spec = name, models, manifest.pipeline
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.config = BatchingConfig(buckets=(1,), max_queue_delay_s=0.0)  # steps batch, not this
    self.capabilities = RunnerCapabilities(fixed_rows=_native_shapes(self.inputs, self.outputs))
    self.observer = observer or Observer()
    self.stats = RunnerStats()
    self.step_stats = {s.name: StepStats() for s in self.spec.steps}
    self._lock = threading.Condition()
    self._pending = 0
    self._stopping = False
    self._sink = _StepSink(self)
    self.edges = Edges(self.spec)
    self._warmer = HandoffWarmer(name, self.spec, models, self.edges, warming=warming)

  # -- Runner protocol -------------------------------------------------------------------------

  def start(self) -> None:
    self._warmer.start()

  def submit(self, req: InferRequest) -> None:
    with self._lock:
      if self._stopping:
        raise ServingError(Code.UNAVAILABLE, f"pipeline {self.name} is shutting down; retry")
      self._pending += 1
    self._advance(_Run(req, dict(req.inputs)))

  def stream(self, prompt: bytes, parameters: Any, request_id: str, on_event: Any) -> Any:
    raise ServingError(Code.INVALID_ARGUMENT, f"pipeline {self.name} answers each request once"
                       " (use ModelInfer)")

  def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
    """Refuses new requests; with `drain`, waits for those in flight (their steps answer them)."""
    with self._lock:
      self._stopping = True
      if drain:
        self._lock.wait_for(lambda: self._pending == 0, timeout)
    self._warmer.stop()

  def close(self) -> None:
    pass

  @property
  def pending_requests(self) -> int:
    return self._pending

  # -- running steps ---------------------------------------------------------------------------

  def _advance(self, run: _Run) -> None:
    """Runs op steps inline until a model step is submitted (its answer resumes the run) or the
    pipeline is done."""
    steps = self.spec.steps
    while run.step < len(steps):
      step = steps[run.step]
      run.t_step = time.perf_counter()
      try:
        inputs = {k: resolve(src, run.tensors) for k, src in step.inputs.items()}
        if step.op is not None:
          outs = OPS[step.op](inputs, step.options)
          self._step_done(run, step, outs, None)
          continue
        runner = self.models(step.model, step.version)
        self._warmer.notice(step.name, runner)
        sub = step_request(step, runner, inputs, run, self._sink, self.edges)
        sub.device_outputs = (step.name in self.edges.producers
                              and self.edges.on_device(runner.capabilities.device_outputs))
        runner.submit(sub)
        return
      except ServingError as e:
        self._fail(run, step, e)
        return
      except Exception as e:  # a bad tensor for an op, a reshape that does not fit
        self._fail(run, step, ServingError(Code.INVALID_ARGUMENT, str(e)))
        return
    self._finish(run)

  @property
  def handoff_counts(self) -> dict[tuple[str, str, str], int]:
    """Tensors handed from a model step to a later one: (step, input, "device"|"host") -> n."""
    return self.edges.handoff.snapshot()

  def _step_done(self, run: _Run, step: Step, outs: Mapping[str, np.ndarray] | None,
                 err: ServingError | None) -> None:
    """Records a step's answer; the caller (or `_resume`) carries on."""
    st = self.step_stats[step.name]
    with self._lock:
      st.count += 1
      st.ns += int((time.perf_counter() - run.t_step) * 1e9)
      st.fail += err is not None
    if err is None:
      run.tensors.update({f"{step.name}.{k}": v for k, v in outs.items()})
      run.step += 1

  def _resume(self, run: _Run, outs: dict[str, np.ndarray] | None,
              err: ServingError | None) -> None:
    step = self.spec.steps[run.step]
    self._step_done(run, step, outs, err)
    if err is not None:
      self._fail(run, step, err, counted=True)
    else:
      self._advance(run)

  def _finish(self, run: _Run) -> None:
    try:
      outputs = {t.name: np.asarray(resolve(self.spec.outputs[t.name], run.tensors),
                                    numpy_dtype(t.dtype)) for t in self.outputs}
      for t in self.outputs:
        if outputs[t.name].shape != tuple(t.shape):
          raise ValueError(f"output {t.name!r} has shape {list(outputs[t.name].shape)}, the"
                           f" pipeline declares {list(t.shape)}")
    except Exception as e:
      self._answer(run, None, ServingError(Code.INTERNAL, f"pipeline {self.name}: its outputs"
                                           f" cannot be assembled: {e}"))
      return
    self._answer(run, outputs, None)

  def _fail(self, run: _Run, step: Step, err: ServingError, *, counted: bool = False) -> None:
    if not counted:
      with self._lock:
        self.step_stats[step.name].fail += 1
    what = f"model {step.model}" if step.model else f"op {step.op}"
    self._answer(run, None, ServingError(
        err.code, f"pipeline {self.name} step {step.name!r} ({what}): {err.message}"))

  def _answer(self, run: _Run, outputs: dict[str, np.ndarray] | None,
              err: ServingError | None) -> None:
    req, now = run.req, time.perf_counter()
    ns = int((now - req.arrival) * 1e9)
    with self._lock:
      st = self.stats
      if err is None:
        st.success_count += 1
        st.success_ns += ns
        st.inference_count += 1
        st.execution_count += 1
        st.last_inference_ms = int(time.time() * 1000)
      else:
        st.fail_count += 1
        st.fail_ns += ns
      self._pending -= 1
      self._lock.notify_all()
    self.observer.request_done(ok=err is None, duration_s=now - req.arrival,
                               code=None if err is None else err.code)
    deliver([(req, outputs, err)])


class _StepSink:
  """Where step runners answer a pipeline's step requests: resumes their runs."""

  def __init__(self, runner: PipelineRunner):
    self.runner = runner

  def complete(self, completions: list[Completion]) -> None:
    for sub, out, err in completions:
      run = sub.sink_token
      try:
        self.runner._resume(run, out, err)
      except Exception as e:  # never leave a request unanswered
        self.runner._answer(run, None, ServingError(Code.INTERNAL,
                                                    f"pipeline {self.runner.name}: {e}"))


def resolve(src: Source, tensors: Mapping[str, Any]) -> Any:
  """The tensor a source names, reshaped as it says (device rows stay on the device)."""
  x = tensors[src.tensor]
  if src.reshape is None:
    return x
  return x.reshape(src.reshape) if isinstance(x, DeviceRows) else np.reshape(x, src.reshape)


def step_request(step: Step, runner: Runner, inputs: Mapping[str, Any], run: _Run, sink: Any,
                 edges: Edges) -> InferRequest:
  """The request a model step sends its model: inputs checked against the model's tensors as
  the protocol codec would (names, ranks, fixed sizes, one row count), numbers cast to its
  dtypes; device rows stay on the device when the runner takes them there."""
  specs = runner.inputs
  takes_device = edges.on_device(runner.capabilities.device_inputs)
  want = {t.name for t in specs}
  if set(inputs) != want:
    raise ServingError(Code.INVALID_ARGUMENT, f"the model takes inputs {sorted(want)}, the"
                       f" pipeline gives {sorted(inputs)}")
  arrays, rows = {}, None
  for t in specs:
    x = edges.hand(step.name, t, inputs[t.name], takes_device)
    if len(x.shape) != len(t.shape) or any(
        n != w for n, w in zip(x.shape, t.shape) if w != -1) or 0 in x.shape[:1]:
      raise ServingError(Code.INVALID_ARGUMENT, f"input {t.name!r} has shape {list(x.shape)},"
                         f" the model takes {list(t.shape)}")
    if t.dims[0] == "batch":
      if rows is not None and x.shape[0] != rows:
        raise ServingError(Code.INVALID_ARGUMENT, f"input {t.name!r} has {x.shape[0]} rows,"
                           f" another input {rows}")
      rows = x.shape[0]
    arrays[t.name] = (x if t.dtype == "object" or isinstance(x, DeviceRows)
                      else x.astype(numpy_dtype(t.dtype), copy=False))
  req = run.req
  return InferRequest(inputs=arrays, rows=rows or 1, sink=sink, arrival=time.perf_counter(),
                      deadline=req.deadline, priority=req.priority, request_id=req.request_id,
                      sink_token=run)
