"""What every runner is: the `Runner` protocol the front ends and the repository use, the
capabilities a runner declares instead of being probed for, its statistics, and delivery.

A runner owns one served model version's queue and execution: the row runner (batched predict
models), the sequence runner (batch x length grid) and the generation runner (continuous
batching, decoupled streaming) all implement it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Protocol, Sequence

from bundle import TensorSpec
from serving.batching import BatchingConfig
from serving.types import Code, Completion, InferRequest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class RunnerCapabilities:
  """What a runner can do, declared once; the front ends branch on these, never on types."""

  instances: int = 1  # batches run at once (Triton's instance_group count)
  decoupled: bool = False  # streams many responses per request (Triton's decoupled policy)
  wants_parameters: bool = False  # reads request parameters (e.g. sampling settings)
  fixed_rows: bool = False  # plain fixed-shape rows, no parameters: the native front end's fast path


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
  """Hooks for metrics; the default does nothing."""

  def batch(self, *, bucket: int, rows: int, queue_s: Sequence[float], compute_s: float) -> None:
    pass

  def request_done(self, *, ok: bool, duration_s: float, code: Code | None) -> None:
    pass

  def queue_depth(self, rows: int, requests: int) -> None:
    pass

  def shed(self) -> None:
    pass


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
