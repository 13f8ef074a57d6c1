"""Rebuilding a READY version in place with other serving settings (an adopted bucket plan):
the new runner loads and warms up (every bucket compiled, on the calling thread) beside the
serving one, then takes its place in one step; the caller then retires the old runner.

A request that picked the old runner just before the swap and finds it stopping is routed
again by the front ends (they compare the version's runner with the one they hold), so the swap
fails no request. A mixin of ModelRepository (serving/repository/repository.py), whose lock
and runner factory it uses.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from serving.repository.config import ModelServingConfig
from serving.runners import Runner
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)


class RebuildMixin:
  """`rebuild`: a READY version's runner replaced by one built with another config."""

  def rebuild(self: Any, name: str, version: int, cfg: ModelServingConfig,
              say: Callable[[str], None], *, expect: Runner | None = None) -> Runner:
    """Builds `name`/`version` with `cfg` and swaps it in; returns the old runner, still
    running: the caller republishes the front ends' tables, then `retire`s it. Raises
    ServingError when the version is not READY (or no longer runs `expect`, when given), and
    whatever the load raised (the old runner then keeps serving)."""
    with self._model_lock(name):
      rec = self.get(name, version)
      old = rec.runner
      if old is None or (expect is not None and old is not expect):
        raise ServingError(Code.UNAVAILABLE, f"{name}/{version} was reloaded meanwhile")
      runner = self._build_runner(self.model_dir(name) / str(version), rec.manifest, cfg, name,
                                  version, say)
      try:
        runner.start()
      except BaseException:
        runner.close()
        raise
      with self._lock:
        rec.runner, rec.config = runner, cfg
      return old


def retire(old: Runner, label: str) -> None:
  """Stops a runner replaced by `rebuild` once it answered what it queued, then frees it."""
  try:
    old.stop(drain=True)
  finally:
    try:
      old.close()
    except Exception:
      logger.exception("%s: releasing the replaced runner failed", label)
