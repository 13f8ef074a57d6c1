"""Request and error types shared by the servicer, runner and repository (no protocol, no JAX)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Mapping

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


class ServingError(Exception):
  """An error with the status a client should see and a message that says what to do."""

  def __init__(self, code: Code, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


@dataclasses.dataclass(slots=True, eq=False)
class InferRequest:
  """One validated predict request: host arrays with a common leading row count.

  `on_done(outputs, error)` is called exactly once, from the runner's thread.
  """

  inputs: Mapping[str, np.ndarray]
  rows: int
  on_done: Callable[[dict[str, np.ndarray] | None, ServingError | None], None]
  arrival: float
  deadline: float | None = None
  priority: int = 0
  request_id: str = ""
  outputs: dict[str, np.ndarray] | None = None  # filled slice by slice by the runner
  queue_ns: int = 0
  compute_ns: int = 0
  parameters: Mapping[str, Any] | None = None  # request parameters, for runners that want them
  failed: bool = False  # answered with an error (later slices of a split request are skipped)
  rows_done: int = 0  # rows whose outputs are in `outputs` (slices may finish out of order)
  extra: Any = None
