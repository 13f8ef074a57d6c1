"""Hot reload by polling: notices new versions, new models and removed models in the repository.

Every `interval_s` the poller compares what is on disk (each model's complete versions,
i.e. those whose manifest.json is written, and its config.json) with the last look.
A changed model is loaded again: newly selected versions load and warm beside the
serving ones (compiles happen on this thread, never at request time), the default
version moves to the newest READY one, then versions the policy no longer selects
drain their queues and are dropped. A model whose folder disappeared is unloaded
(after draining). Drop a new version in with a rename (export elsewhere, then
`mv staging/3 repo/model/3`), or export straight into the repository: a version is
only considered once its manifest (written last) exists.
"""

from __future__ import annotations

import logging
from typing import Callable

from serving.repository.config import CONFIG_FILE
from serving.repository.periodic import Periodic
from serving.repository.repository import ModelRepository
from serving.types import ServingError

logger = logging.getLogger(__name__)

Snapshot = dict[str, tuple[tuple[int, ...], bytes | None]]


class RepositoryPoller:
  """A background thread that keeps the served models in step with the repository folder."""

  def __init__(self, repository: ModelRepository, interval_s: float, *,
               progress: Callable[[str], None] | None = None,
               on_change: Callable[[], None] | None = None):
    if interval_s <= 0:
      raise ValueError(f"interval_s must be > 0, got {interval_s}")
    self.repo = repository
    self.interval_s = interval_s
    self.progress = progress or (lambda msg: logger.info("%s", msg))
    self.on_change = on_change
    self.polls = 0
    self._seen: Snapshot = {}
    self._thread = Periodic("repository-poller", self.poll_once, lambda: self.interval_s)

  def snapshot(self) -> Snapshot:
    """{model: (complete versions, config.json bytes or None)} for every model on disk (contents,
    not mtimes: two writes within one clock tick must still count as a change)."""
    snap: Snapshot = {}
    for name in self.repo.discover():
      try:
        versions = tuple(self.repo.complete_versions(name))
        cfg = self.repo.model_dir(name) / CONFIG_FILE
        config = cfg.read_bytes() if cfg.is_file() else None
      except (ServingError, OSError):  # refused name or a folder vanishing mid-look
        continue
      snap[name] = (versions, config)
    return snap

  def prime(self) -> RepositoryPoller:
    """Records the current state as seen (call before the initial load_all)."""
    self._seen = self.snapshot()
    return self

  def poll_once(self) -> list[str]:
    """Applies what changed since the last look; returns the models it acted on."""
    now = self.snapshot()
    acted = []
    for name in sorted(set(self._seen) | set(now)):
      if self._seen.get(name) == now.get(name):
        continue
      acted.append(name)
      try:
        if name not in now:
          self.progress(f"{name}: gone from the repository; unloading after draining")
          self.repo.unload(name)
        else:
          self.progress(f"{name}: changed on disk (versions {list(now[name][0])}); loading")
          self.repo.load(name, progress=self.progress)
      except ServingError as e:  # e.g. unloading a model that was never loaded
        logger.info("%s: %s", name, e.message)
      except Exception:  # a broken model must not stop the poller
        logger.exception("%s: reload failed", name)
    self._seen = now
    self.polls += 1
    if acted and self.on_change is not None:
      self.on_change()
    return acted

  def start(self) -> RepositoryPoller:
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    self._thread.stop(timeout)
