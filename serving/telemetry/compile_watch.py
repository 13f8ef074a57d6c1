"""Counts XLA backend compiles through JAX's monitoring events, to prove none happen at request time."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Counts compiles in this process, split into warm-up and everything else.

  Code that loads and warms a model runs inside `warming()`; a compile seen on
  any thread outside such a block counts in `outside_warmup` (the figure that must
  stay zero). JAX listeners cannot be removed: install one counter per process.
  """

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._local = threading.local()
    self._warmup = 0
    self._outside = 0
    self._installed = False

  def install(self) -> CompileCounter:
    import jax

    with self._lock:
      if not self._installed:
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self._installed = True
    return self

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
      return
    warming = getattr(self._local, "depth", 0) > 0
    with self._lock:
      if warming:
        self._warmup += 1
      else:
        self._outside += 1

  @contextlib.contextmanager
  def warming(self) -> Iterator[None]:
    """Marks compiles on this thread as warm-up."""
    self._local.depth = getattr(self._local, "depth", 0) + 1
    try:
      yield
    finally:
      self._local.depth -= 1

  @property
  def warmup(self) -> int:
    with self._lock:
      return self._warmup

  @property
  def outside_warmup(self) -> int:
    with self._lock:
      return self._outside
