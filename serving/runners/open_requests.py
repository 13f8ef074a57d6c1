"""The requests a runner accepted and has not answered yet, so each is answered exactly once:
when a batching decision or the answering of a batch raises (a bug), the runner fails what that
left unanswered instead of losing it, and keeps serving."""

from __future__ import annotations

import threading
from typing import Callable, Generic, Iterable, TypeVar

from serving.batching import Pending

T = TypeVar("T")
X = TypeVar("X")


class OpenRequests(Generic[T]):
  """Accepted, unanswered requests by identity; thread-safe."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._open: dict[int, Pending[T]] = {}

  def accepted(self, pending: Pending[T]) -> None:
    with self._lock:
      self._open[id(pending.item)] = pending

  def close(self, items: Iterable[X], request: Callable[[X], T] = lambda x: x) -> list[X]:
    """Marks the requests of `items` (each `request(item)`) answered; returns the items whose
    request was still open: the ones to answer now."""
    with self._lock:
      return [x for x in items if self._open.pop(id(request(x)), None) is not None]

  def unfinished(self) -> list[Pending[T]]:
    """Open requests with rows not yet placed in a batch: queued, or taken out of the queue by
    a decision that raised before it returned them."""
    with self._lock:
      return [p for p in self._open.values() if p.remaining > 0]

  def among(self, pendings: Iterable[Pending[T]]) -> list[Pending[T]]:
    """Those of `pendings` still open."""
    with self._lock:
      return [p for p in pendings if id(p.item) in self._open]
