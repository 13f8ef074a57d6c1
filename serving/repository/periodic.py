"""A background thread that does one step of repository work every so often (the hot-reload
poller, the bucket planner) until stopped; a failing step is logged and the next one runs."""

from __future__ import annotations

import logging
import threading
from typing import Callable

logger = logging.getLogger(__name__)


class Periodic:
  """Calls `step()` after each `wait_s()` seconds on a daemon thread named `name`."""

  def __init__(self, name: str, step: Callable[[], object], wait_s: Callable[[], float]):
    self._step, self._wait_s, self._name = step, wait_s, name
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout)

  def _loop(self) -> None:
    while not self._stop.wait(self._wait_s()):
      try:
        self._step()
      except Exception:  # a bug in one step must stop neither this thread nor the server
        logger.exception("%s: a periodic step failed", self._name)
