"""Request, completion and error types shared by every stage (no protocol, no JAX).

A request carries its completion sink: the front end that accepted it and that answers it.
Runners hand finished requests to `req.sink` (serving/runners/base.py `deliver`), one call per
sink per batch, so an asyncio front end pays one wake-up per batch, not per request.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, Protocol

import numpy as np


class Code(enum.Enum):
  """Failure kinds; the servicer maps each to its gRPC status."""

  INVALID_ARGUMENT = "INVALID_ARGUMENT"
  NOT_FOUND = "NOT_FOUND"
  RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
  DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
  UNAVAILABLE = "UNAVAILABLE"
  INTERNAL = "INTERNAL"
  UNAUTHENTICATED = "UNAUTHENTICATED"
  CANCELLED = "CANCELLED"


# gRPC's numeric status of each failure kind (the native queue answers with these).
# Every front end refuses with this (UNAVAILABLE) once a graceful shutdown has begun.
SHUTTING_DOWN = "server is shutting down; retry on another replica"
GRPC_STATUS = {Code.INVALID_ARGUMENT: 3, Code.DEADLINE_EXCEEDED: 4, Code.NOT_FOUND: 5,
               Code.RESOURCE_EXHAUSTED: 8, Code.CANCELLED: 1, Code.INTERNAL: 13,
               Code.UNAVAILABLE: 14, Code.UNAUTHENTICATED: 16}


class ServingError(Exception):
  """An error with the status a client should see and a message that says what to do."""

  def __init__(self, code: Code, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


@dataclasses.dataclass(slots=True, eq=False)
class InferRequest:
  """One validated predict request: host arrays with a common leading row count.

  The runner answers it exactly once, through `sink.complete`, from a runner thread;
  `sink_token` is the sink's own handle for it (an asyncio future, a native call id).
  """

  inputs: Mapping[str, np.ndarray]
  rows: int
  sink: CompletionSink
  arrival: float
  deadline: float | None = None
  priority: int = 0
  request_id: str = ""
  sink_token: Any = None
  outputs: dict[str, np.ndarray] | None = None  # filled slice by slice by the runner
  queue_ns: int = 0
  compute_ns: int = 0
  parameters: Mapping[str, Any] | None = None  # request parameters, for runners that want them
  failed: bool = False  # answered with an error (later slices of a split request are skipped)
  rows_done: int = 0  # rows whose outputs are in `outputs` (slices may finish out of order)
  # The params generations (live updates) that scored its rows, lowest and highest: equal
  # unless a request split across batches straddled an update; (0, 0): the bundle's params.
  generations: tuple[int, int] = (0, 0)
  trace: Any = None  # a sampled request's trace (serving/telemetry/tracing.py); None: untraced
  # Answer with device views of the batch outputs (serving/runners/handoff.py) where the runner
  # can: a pipeline step whose outputs feed a later model step on the device.
  device_outputs: bool = False


def merge_generations(req: InferRequest, generation: int, first: bool) -> None:
  """Records that a slice of `req` ran at `generation` (`first`: its first slice done)."""
  lo, hi = req.generations
  req.generations = ((generation, generation) if first
                     else (min(lo, generation), max(hi, generation)))


Completion = tuple[InferRequest, "dict[str, np.ndarray] | None", "ServingError | None"]


class CompletionSink(Protocol):
  """Where answers go: the front end that accepted the requests.

  `complete` gets finished requests that name this sink, a batch at a time, on a runner
  thread; it must neither block nor raise (a failure must answer the requests some other way).
  """

  def complete(self, completions: list[Completion]) -> None:
    ...


class CallbackSink:
  """A sink for in-process callers: calls each request's `sink_token(outputs, error)`."""

  def complete(self, completions: list[Completion]) -> None:
    for req, out, err in completions:
      req.sink_token(out, err)
