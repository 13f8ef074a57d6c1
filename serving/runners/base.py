"""What every runner is: the `Runner` protocol the front ends and the repository use, the
capabilities a runner declares instead of being probed for, its statistics, and delivery.

A runner owns one served model version's queue and execution: the row runner (batched predict
models), the sequence runner (batch x length grid) and the generation runner (continuous
batching, decoupled streaming) all implement it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from bundle import TensorSpec
from serving.batching import BatchingConfig
from serving.types import Code, Completion, InferRequest, ServingError

logger = logging.getLogger(__name__)
# Per-request outcome records go to this logger (the name operators already filter on).
REQUEST_LOGGER = "serving.frontend.servicer"


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerCapabilities:
  """What a runner can do, declared once; the front ends branch on these, never on types."""

  instances: int = 1  # batches run at once (Triton's instance_group count)
  decoupled: bool = False  # streams many responses per request (Triton's decoupled policy)
  wants_parameters: bool = False  # reads request parameters (e.g. sampling settings)
  fixed_rows: bool = False  # plain fixed-shape rows, no parameters: the native front end's fast path
  queue: Any = None  # the runner's native batch queue, which the native front end feeds directly
  # Pipeline hand-off (serving/runners/handoff.py): the device a runner assembles batches on
  # from device tensors, and the device its outputs stay on for `device_outputs` requests.
  device_inputs: Any = None
  device_outputs: Any = None


@dataclasses.dataclass(slots=True)
class RunnerStats:
  """Counters in Triton's ModelStatistics terms (nanoseconds)."""

  success_count: int = 0
  success_ns: int = 0
  fail_count: int = 0
  fail_ns: int = 0
  queue_ns: int = 0
  compute_input_ns: int = 0
  compute_infer_ns: int = 0
  compute_output_ns: int = 0
  inference_count: int = 0  # rows
  execution_count: int = 0  # batches
  last_inference_ms: int = 0
  batch_counts: dict[int, int] = dataclasses.field(default_factory=dict)
  expired: int = 0
  rejected: int = 0


class Observer:
  """Hooks for metrics and tracing; the default does nothing."""

  tracing = False  # True: runners hand batches holding traced requests to `traced_batch`

  def batch(self, *, bucket: int, rows: int, queue_s: Sequence[float], compute_s: float) -> None:
    pass

  def batches(self, *, buckets: Sequence[int], rows: Sequence[int], compute_s: Sequence[float],
              queue_s: Sequence[float]) -> None:
    """Many batches at once (a native queue's, taken now and then): per batch its bucket, real
    rows and compute seconds, and the queue waits of the requests they answered."""
    for i, (bucket, n, c) in enumerate(zip(buckets, rows, compute_s)):
      self.batch(bucket=bucket, rows=n, queue_s=queue_s if i == 0 else (), compute_s=c)

  def batch_timing(self, *, start: float, done: float, rows: int, requests: int,
                   assembly_s: float, encode_s: float) -> None:
    """A finished batch's timeline for profiles: in flight from `start` to `done`
    (perf_counter seconds), assembling its inputs and handing out its answers took these."""

  def request_done(self, *, ok: bool, duration_s: float, code: Code | None) -> None:
    pass

  def requests_done(self, *, ok_s: Sequence[float],
                    failed: Sequence[tuple[Code, float]] = ()) -> None:
    """Many requests at once (a batch's): seconds since arrival of those answered OK, and
    (code, seconds) of those failed. Runners that batch in C++ call this once per batch."""
    for d in ok_s:
      self.request_done(ok=True, duration_s=d, code=None)
    for code, d in failed:
      self.request_done(ok=False, duration_s=d, code=code)

  def queue_depth(self, rows: int, requests: int) -> None:
    pass

  def traced_batch(self, *, bucket: int, rows: int, requests: Sequence[InferRequest],
                   t_taken: float, t_dispatch: float, t_done: float,
                   natives: Sequence[tuple] = (), t_sent: float = 0.0) -> None:
    """A batch holding traced requests (called only when `tracing`): when it was taken from
    the queue, dispatched and done (perf_counter), before the Python ones' (`req.trace` set)
    answers go out; `natives`: records of those a native queue answered, at `t_sent`
    (name, traceparent, tracestate, request id, rows, start, arrival, queue seconds)."""

  def request_sizes(self, rows: Sequence[int]) -> None:
    """Rows of requests that started running (once each): the traffic bucket plans learn from."""

  def request_lengths(self, lengths: Sequence[int]) -> None:
    """Sequence lengths of requests that started running (sequence models)."""

  def shed(self, n: int = 1) -> None:
    pass

  def on_scrape(self, refresh: Callable[..., None], **kwargs: Any) -> None:
    """Asks for `refresh(**kwargs)` before each metrics scrape (counters kept outside Python,
    e.g. by a native queue, are brought up to date); held weakly by its owner."""


class Runner(Protocol):
  """One served model version: takes requests, answers each through its sink."""

  name: str
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  config: BatchingConfig  # buckets and queue delay (reported in ModelConfig)
  stats: RunnerStats
  capabilities: RunnerCapabilities

  def start(self) -> None:
    """Starts the runner's threads."""

  def submit(self, req: InferRequest) -> None:
    """Queues a request; raises ServingError when it is refused (nothing is queued then)."""

  def stream(self, prompt: bytes, parameters: Mapping[str, Any], request_id: str,
             on_event: Callable[[Any], None]) -> Any:
    """Decoupled runners: starts one streamed request; returns a handle with `cancel()`."""

  def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
    """Stops; with `drain`, every queued request is answered first."""

  def close(self) -> None:
    """Releases device memory (after `stop`)."""

  @property
  def pending_requests(self) -> int:
    """Requests accepted and not yet answered."""


class BatchedRunner:
  """What the batched (non-decoupled) runners share: worker threads in `_threads`, an `engine`,
  and no streaming."""

  name: str
  engine: Any
  _threads: list[Any]

  def start(self) -> None:
    for t in self._threads:
      t.start()

  def stream(self, prompt: bytes, parameters: Any, request_id: str, on_event: Any) -> Any:
    raise ServingError(Code.INVALID_ARGUMENT, f"model {self.name} is not decoupled: it answers"
                       " each request once (use ModelInfer)")

  def close(self) -> None:
    self.engine.close()


def nan_error(model: str, outs: Mapping[str, Any], rows: int) -> ServingError | None:
  """With nan_policy "error": the error for a batch whose first `rows` rows (padding excluded)
  hold a NaN in a floating-point output, naming the output; None when there is none."""
  for name, out in outs.items():
    a = np.asarray(out)
    if a.dtype.kind == "f" and np.isnan(a[:rows]).any():
      return ServingError(Code.INTERNAL, f"model {model} produced NaN in output {name}"
                          " (nan_policy: error)")
  return None


def deliver(completions: list[Completion]) -> None:
  """Hands finished requests to their sinks, one call per sink (usually one per batch). A broken
  sink must not stop the runner thread that calls this."""
  if not completions:
    return
  first = completions[0][0].sink
  if all(c[0].sink is first for c in completions):
    groups = [(first, completions)]
  else:
    by_sink: dict[int, tuple[Any, list[Completion]]] = {}
    for c in completions:
      by_sink.setdefault(id(c[0].sink), (c[0].sink, []))[1].append(c)
    groups = list(by_sink.values())
  for sink, group in groups:
    try:
      sink.complete(group)
    except Exception:
      logger.exception("delivering %d answers failed", len(group))


def request_log_enabled(err: ServingError | None = None) -> bool:
  """Whether a request outcome would be logged (DEBUG for most, ERROR for server faults)."""
  level = logging.DEBUG if err is None or err.code is not Code.INTERNAL else logging.ERROR
  return logging.getLogger(REQUEST_LOGGER).isEnabledFor(level)


def log_outcome(model: str, version: str, request_id: str, err: ServingError | None,
                t0: float) -> None:
  """One structured record per request: ERROR for server faults, DEBUG otherwise."""
  log = logging.getLogger(REQUEST_LOGGER)
  level = logging.DEBUG if err is None or err.code is not Code.INTERNAL else logging.ERROR
  if log.isEnabledFor(level):
    log.log(level, "infer %s", "ok" if err is None else err.code.value, extra={
        "request_id": request_id, "model": model, "version": version,
        "code": "OK" if err is None else err.code.value,
        "latency_ms": round((time.perf_counter() - t0) * 1e3, 3),
        **({} if err is None else {"error": err.message})})

