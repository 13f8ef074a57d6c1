"""Rebuilding a READY version in place with other batch buckets: an adopted bucket plan
(`rebuild`), or a config.json whose `batch_buckets` or `bucket_plan` changed (`rebuild_changed`,
called by every load of the model). The new runner loads and warms up (every bucket compiled,
on the calling thread) beside the serving one, then takes its place in one step; the old one
answers what it queued, then is freed.

A request that picked the old runner just before the swap and finds it stopping is routed
again by the front ends (they compare the version's runner with the one they hold), so the swap
fails no request. A mixin of ModelRepository (serving/repository/repository.py), whose locks
and runner factory it uses.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from serving.repository.config import ModelServingConfig
from serving.runners import Runner
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)


def buckets_changed(old: ModelServingConfig, new: ModelServingConfig) -> bool:
  """Whether config.json asks for other buckets than the version was built with (an adopted
  plan, `adopted_buckets`, is not config.json's and does not count)."""
  return (old.batch_buckets, old.bucket_plan) != (new.batch_buckets, new.bucket_plan)


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
      if rec.runner is None or (expect is not None and rec.runner is not expect):
        raise ServingError(Code.UNAVAILABLE, f"{name}/{version} was reloaded meanwhile")
      return self._swap_runner(rec, cfg, say)

  def rebuild_changed(self: Any, recs: Sequence[Any], cfg: ModelServingConfig,
                      say: Callable[[str], None]) -> None:
    """Rebuilds each READY version of `recs` whose buckets config.json changed (call with the
    model's load lock held); a failed rebuild keeps the version serving as it was."""
    for rec in recs:
      if rec.runner is None or not buckets_changed(rec.config, cfg):
        continue
      label = f"{rec.name}/{rec.version}"
      say(f"{label}: config.json changes its buckets (batch_buckets {cfg.batch_buckets},"
          f" bucket_plan {cfg.bucket_plan.mode}); compiling beside the serving runner")
      try:
        retire(self._swap_runner(rec, cfg, say), label)
      except Exception as e:  # the old runner keeps serving
        logger.exception("%s: rebuilding with the new buckets failed", label)
        say(f"{label}: rebuilding with the new buckets failed ({e}); still serving"
            f" {list(rec.runner.config.buckets)}")

  def _swap_runner(self: Any, rec: Any, cfg: ModelServingConfig,
                   say: Callable[[str], None]) -> Runner:
    """Builds and starts `rec`'s version with `cfg`, then swaps it in; returns the old runner."""
    runner = self._build_runner(self.model_dir(rec.name) / str(rec.version), rec.manifest, cfg,
                                rec.name, rec.version, say)
    try:
      runner.start()
    except BaseException:
      runner.close()
      raise
    with self._lock:
      old, rec.runner, rec.config = rec.runner, runner, cfg
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
