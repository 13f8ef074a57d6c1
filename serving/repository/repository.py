"""The model repository: finds bundles on disk, loads the versions a policy selects, tracks their state.

Layout: `<root>/<model>/<version>/` bundles, plus an optional `<root>/<model>/config.json`
(a ModelServingConfig: version policy, batching, sharding). A model whose load
fails is marked UNAVAILABLE with the reason; every other model keeps serving.

A version counts once its `manifest.json` exists (bundles write it last). Loading a
model again (RepositoryModelLoad, or the poller in serving/repository/reload.py) loads and warms
newly selected versions beside the serving ones; the default version moves to the
newest READY one atomically, then versions the policy no longer selects drain their
queues and are dropped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import json
import logging
import pathlib
import threading
import time
from typing import Callable, Mapping

import bundle as bundle_lib
from bundle import BundleError, Manifest
from serving.repository.config import CONFIG_FILE, LoadSpec, ModelServingConfig, RunnerFactory
from serving.repository.rebuild import RebuildMixin
from serving.repository.traffic import TrafficTable, unloaded_versions
from serving.runners import Observer, Runner, RowQueueFactory
from serving.telemetry.compile_watch import CompileCounter
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)


class State(enum.Enum):
  LOADING = "LOADING"
  READY = "READY"
  UNAVAILABLE = "UNAVAILABLE"
  UNLOADING = "UNLOADING"


@dataclasses.dataclass(slots=True, eq=False)
class ServedVersion:
  """One model version and its state; `runner` is set once READY."""

  name: str
  version: int
  state: State
  reason: str = ""
  manifest: Manifest | None = None
  runner: Runner | None = None
  config: ModelServingConfig = dataclasses.field(default_factory=ModelServingConfig)
  load_s: float = 0.0
  retired: bool = False  # unloaded on purpose (unload, or no longer selected): not "unready"
  code: Code = Code.INTERNAL  # the status a failed load answers RepositoryModelLoad with


ObserverFactory = Callable[[str, int], Observer]


class ModelRepository(RebuildMixin):
  """Loads and serves the models under `root`; thread-safe lookups; `rebuild` (rebuild.py)."""

  def __init__(
      self,
      root: str | pathlib.Path,
      *,
      kinds: Mapping[str, RunnerFactory] | None = None,
      observer_factory: ObserverFactory | None = None,
      compile_counter: CompileCounter | None = None,
      default_config: ModelServingConfig = ModelServingConfig(),
      row_queue: RowQueueFactory | None = None,
  ):
    """`row_queue`: makes the native batch queue of each plain batched model (the native front
    end's; None: runners batch in Python)."""
    self.root = pathlib.Path(root).resolve()
    if not self.root.is_dir():
      raise FileNotFoundError(f"model repository {self.root} does not exist; create it or pass"
                              " --model-repository pointing at exported bundles")
    self.kinds = dict(kinds or {})  # manifest kind -> runner factory
    self.observer_factory = observer_factory or (lambda name, version: Observer())
    self.compiles = compile_counter or CompileCounter()
    self.default_config = default_config
    self.row_queue = row_queue
    self._lock = threading.RLock()
    self._load_locks: dict[str, threading.Lock] = {}  # one load/unload of a model at a time
    self._models: dict[str, dict[int, ServedVersion]] = {}
    self._defaults: dict[str, ServedVersion] = {}  # newest READY version, rebuilt on changes
    # Served name -> (folder, signature) for each signature of a multi-signature bundle.
    self._aliases: dict[str, tuple[str, str]] = {}
    self.traffic = TrafficTable()  # each model's canary split and shadow version, as loaded

  def _refresh_defaults(self) -> None:
    """Recomputes the default-version table (call with the lock held); swapped atomically."""
    table = {}
    for name, versions in self._models.items():
      ready = [r for v, r in sorted(versions.items())
               if r.state is State.READY and not self.traffic.is_shadow(name, v)]
      if ready:
        table[name] = ready[-1]
    self._defaults = table

  def default_version(self, name: str) -> ServedVersion | None:
    """The version a request without a version gets, or None; no lock (hot path)."""
    return self._defaults.get(name)

  # -- discovery and loading ---------------------------------------------------

  @staticmethod
  def check_name(name: str) -> None:
    """Refuses names that are not plain folder names (no separators, no '..')."""
    if not bundle_lib.MODEL_NAME_RE.fullmatch(name) or name in (".", ".."):  # fullmatch: no trailing "\n"
      raise ServingError(Code.INVALID_ARGUMENT, f"invalid model name {name!r}: use letters,"
                         " digits, '_', '-' and '.' only")

  def model_dir(self, name: str) -> pathlib.Path:
    """The folder of model `name`, refusing names that would leave the repository."""
    self.check_name(name)
    folder = self._aliases.get(name, (name,))[0]  # a signature's model lives in its bundle's
    path = (self.root / folder).resolve()
    if path.parent != self.root:
      raise ServingError(Code.INVALID_ARGUMENT, f"invalid model name {name!r}: its folder"
                         " resolves outside the repository (a symlink?); models must live in it")
    return path

  def discover(self) -> list[str]:
    """Served model names: one per folder, or one per signature of a multi-signature bundle."""
    folders = sorted(p.name for p in self.root.iterdir()
                     if p.is_dir() and bundle_lib.MODEL_NAME_RE.fullmatch(p.name)
                     and bundle_lib.list_versions(p))
    return sorted(n for f in folders for n in self.served_names(f))

  def served_names(self, name: str) -> list[str]:
    """The models folder `name` serves (`bundle.served_models` of its newest bundle)."""
    if name in self._aliases:
      return [name]
    try:
      versions = self.complete_versions(name)
      if not versions:
        return [name]
      served = bundle_lib.served_models(
          name, bundle_lib.read_manifest(self.model_dir(name) / str(versions[-1])))
    except (BundleError, ServingError):
      return [name]  # load() reports what is wrong
    with self._lock:
      for n, sig in served.items():
        if n != name:
          self._aliases[n] = (name, sig)
    return sorted(served)

  def complete_versions(self, name: str) -> list[int]:
    """Versions of `name` on disk whose manifest is written (a bundle still being copied is not)."""
    model_dir = self.model_dir(name)
    return [v for v in bundle_lib.list_versions(model_dir)
            if (model_dir / str(v) / bundle_lib.MANIFEST).is_file()]

  def _model_lock(self, name: str) -> threading.Lock:
    with self._lock:
      return self._load_locks.setdefault(name, threading.Lock())

  def read_config(self, name: str) -> ModelServingConfig:
    path = self.model_dir(name) / CONFIG_FILE
    if not path.exists():
      return self.default_config
    try:
      return ModelServingConfig.from_json(json.loads(path.read_text()), self.default_config)
    except (ValueError, TypeError, json.JSONDecodeError) as e:
      raise BundleError(f"{path}: {e}") from e

  def load_all(self, progress: Callable[[str], None] | None = None, *,
               threads: int = 1) -> None:
    """Loads every model found under the root, `threads` models at a time (Triton's
    --model-load-thread-count: restoring and compiling one model leaves cores idle); failures
    are recorded, not raised."""
    def load_one(name: str) -> None:
      try:
        self.load(name, progress=progress)
      except ServingError as e:  # e.g. a symlink leading out of the repository
        with self._lock:
          self._models.setdefault(name, {})[0] = ServedVersion(name, 0, State.UNAVAILABLE,
                                                               e.message)
        logger.error("%s: not loaded: %s", name, e.message)

    names = self.discover()
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(names))),
                                               thread_name_prefix="model-load") as pool:
      list(pool.map(load_one, names))

  def load(self, name: str, progress: Callable[[str], None] | None = None) -> list[ServedVersion]:
    """Loads the versions of `name` its policy selects, then retires the ones it no longer
    selects (after draining them); returns the selected versions' records."""
    say = progress or (lambda msg: None)
    model_dir = self.model_dir(name)
    if not model_dir.is_dir():
      raise ServingError(Code.NOT_FOUND, f"model {name!r} is not in the repository {self.root}")
    served = self.served_names(name)
    if served != [name]:  # a multi-signature bundle: one model per signature
      return [r for n in served for r in self.load(n, progress)]
    with self._model_lock(name):
      try:
        cfg = self.read_config(name)
        on_disk = bundle_lib.list_versions(model_dir)
        wanted = cfg.select(self.complete_versions(name))
        if not wanted:
          raise BundleError(f"no complete version of {name} under {model_dir} matches policy"
                            f" {cfg.version_policy} (versions on disk: {on_disk}; a version"
                            f" counts once its {bundle_lib.MANIFEST} is written)")
        if problem := unloaded_versions(cfg.traffic, cfg.shadow, wanted):
          raise BundleError(f"{model_dir / CONFIG_FILE}: {problem}")
      except BundleError as e:
        with self._lock:
          serving = [r for r in self._models.get(name, {}).values() if r.state is State.READY]
        if serving:  # keep serving what works; the reload is what failed
          logger.error("%s: reload refused, keeping versions %s: %s", name,
                       [r.version for r in serving], e)
          say(f"{name}: reload failed, still serving {[r.version for r in serving]}: {e}")
          return serving
        rec = ServedVersion(name, 0, State.UNAVAILABLE, str(e))
        with self._lock:
          self._models.setdefault(name, {})[0] = rec
        say(f"{name}: UNAVAILABLE: {e}")
        return [rec]
      self.traffic.set(name, cfg.traffic, cfg.shadow)  # before a new shadow version turns READY
      with self._lock:
        self._refresh_defaults()
      recs = [self._load_version(name, v, cfg, say) for v in wanted]
      self.rebuild_changed(recs, cfg, say)  # READY versions whose config.json buckets changed
      if any(r.state is State.READY for r in recs):
        with self._lock:
          stale = [v for v, r in self._models.get(name, {}).items()
                   if v not in wanted and r.state is State.READY]
        for v in stale:
          say(f"{name}/{v}: retiring (policy {cfg.version_policy} now selects {wanted})")
          self._unload_locked(name, v, drain=True,
                              reason=f"retired: version policy selects {wanted}")
      return recs

  def _load_version(self, name: str, version: int, cfg: ModelServingConfig,
                    say: Callable[[str], None]) -> ServedVersion:
    rec = ServedVersion(name, version, State.LOADING, config=cfg)
    with self._lock:
      self._models.setdefault(name, {}).pop(0, None)
      self._models[name].setdefault(version, rec)
      rec = self._models[name][version]
      if rec.state is State.READY:
        return rec
      rec.state, rec.config, rec.retired = State.LOADING, cfg, False
    t0 = time.perf_counter()
    path = self.model_dir(name) / str(version)
    runner = None
    try:
      manifest = bundle_lib.read_manifest(path)
      folder, signature = self._aliases.get(name, (name, None))
      if signature is not None:  # this model serves one signature of a multi-signature bundle
        manifest = bundle_lib.only_signature(manifest, signature)
      if manifest.name != folder or manifest.version != version:
        logger.warning("%s: manifest says %s/%s; serving it as %s/%s", path, manifest.name,
                       manifest.version, name, version)
      runner = self._build_runner(path, manifest, cfg, name, version, say)
      runner.start()
    except Exception as e:  # any failure isolates this version only
      if isinstance(e, bundle_lib.BundleError):  # explained by its message: no traceback
        logger.error("loading %s/%s failed: %s", name, version, e)
      else:
        logger.exception("loading %s/%s failed", name, version)
      if runner is not None:
        try:
          runner.close()  # give back what it allocated
        except Exception:
          logger.exception("%s/%s: releasing a failed runner failed", name, version)
      reason = f"load failed: {type(e).__name__}: {e}"
      if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        reason += " (out of memory while loading or warming up: free memory, use fewer"
        reason += " buckets or versions, or shard the model over more devices)"
      with self._lock:
        rec.state, rec.reason = State.UNAVAILABLE, reason
        rec.code = e.code if isinstance(getattr(e, "code", None), Code) else Code.INTERNAL
      say(f"{name}/{version}: UNAVAILABLE: {rec.reason}")
      return rec
    return self._mark_ready(rec, manifest, runner, t0, say)

  def _build_runner(self, path: pathlib.Path, manifest: Manifest, cfg: ModelServingConfig,
                    name: str, version: int, say: Callable[[str], None]) -> Runner:
    """The runner for one version, from the factory its manifest kind names."""
    factory = self.kinds.get(manifest.kind)
    if factory is None:
      raise BundleError(f"{path}: this server does not serve bundles of kind {manifest.kind!r}"
                        f" (it serves {sorted(self.kinds)})")
    spec = LoadSpec(path, manifest, cfg, f"{name}/{version}",
                    self.observer_factory(name, version),
                    lambda msg: say(f"{name}/{version}: {msg}"), self.row_queue, self.runner_of,
                    self.compiles.warming)
    with self.compiles.warming():
      return factory(spec)

  def _mark_ready(self, rec: ServedVersion, manifest: Manifest, runner: Runner, t0: float,
                  say: Callable[[str], None]) -> ServedVersion:
    with self._lock:
      rec.manifest, rec.runner, rec.load_s = manifest, runner, time.perf_counter() - t0
      rec.state, rec.reason = State.READY, ""
      self._refresh_defaults()
    instances = runner.capabilities.instances
    say(f"{rec.name}/{rec.version}: READY in {rec.load_s:.2f}s"
        + (f" ({instances} instances: up to {instances} batches at once)" if instances > 1 else ""))
    return rec

  def unload(self, name: str, version: int | None = None, *, drain: bool = True) -> None:
    """Stops serving `name` (one version or all); queued requests are answered when draining."""
    with self._model_lock(name):
      self._unload_locked(name, version, drain=drain)

  def _unload_locked(self, name: str, version: int | None, *, drain: bool,
                     reason: str = "unloaded") -> None:
    with self._lock:
      versions = self._models.get(name)
      if not versions:
        raise ServingError(Code.NOT_FOUND, f"model {name!r} is not loaded")
      recs = [versions[version]] if version is not None and version in versions else (
          list(versions.values()) if version is None else [])
      if not recs:
        raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version {version}")
      for rec in recs:
        rec.state = State.UNLOADING
      self._refresh_defaults()
    for rec in recs:
      if rec.runner is not None:
        rec.runner.stop(drain=drain)
        rec.runner.close()
      with self._lock:
        rec.state, rec.reason, rec.runner, rec.retired = State.UNAVAILABLE, reason, None, True

  def stop(self, *, drain: bool = True) -> None:
    """Stops every runner (answering queued requests first when draining)."""
    with self._lock:
      recs = [r for vs in self._models.values() for r in vs.values() if r.runner is not None]
    for rec in recs:
      rec.runner.stop(drain=drain)

  # -- lookups -----------------------------------------------------------------

  def get(self, name: str, version: int | None = None) -> ServedVersion:
    """The READY version to serve (the newest ready one by default), or a ServingError."""
    with self._lock:
      versions = self._models.get(name)
      if not versions:
        raise ServingError(Code.NOT_FOUND, f"model {name!r} is not in the repository; list models"
                           " with RepositoryIndex")
      if version is None:
        ready = [r for v, r in sorted(versions.items())
                 if r.state is State.READY and not self.traffic.is_shadow(name, v)]
        if not ready:
          reasons = "; ".join(f"v{r.version}: {r.state.value} {r.reason}".strip()
                              for r in versions.values())
          raise ServingError(Code.UNAVAILABLE, f"model {name!r} has no ready version ({reasons})")
        return ready[-1]
      rec = versions.get(version)
      if rec is None:
        raise ServingError(Code.NOT_FOUND, f"model {name!r} has no version {version} (loaded:"
                           f" {sorted(v for v in versions if v)})")
      if rec.state is not State.READY:
        raise ServingError(Code.UNAVAILABLE, f"model {name!r} version {version} is"
                           f" {rec.state.value}: {rec.reason}")
      return rec

  def runner_of(self, name: str, version: int | None = None) -> Runner:
    """The runner of `name`'s READY version (default: newest), or a ServingError saying why not."""
    rec = self.default_version(name) if version is None else None
    rec = rec or self.get(name, version)
    runner = rec.runner
    if runner is None:
      raise ServingError(Code.UNAVAILABLE, f"model {name!r} was just unloaded; retry")
    return runner

  def records(self) -> list[ServedVersion]:
    with self._lock:
      return [r for name in sorted(self._models) for _, r in sorted(self._models[name].items())]

  def runners_of_kind(self, kind: str) -> list[tuple[str, Runner]]:
    """("<model>/<version>", runner) for every loaded version whose manifest kind is `kind`."""
    return [(f"{r.name}/{r.version}", r.runner) for r in self.records()
            if r.runner is not None and r.manifest is not None and r.manifest.kind == kind]

  def versions_of(self, name: str) -> list[ServedVersion]:
    with self._lock:
      return [r for _, r in sorted(self._models.get(name, {}).items())]

  @property
  def all_ready(self) -> bool:
    """Every model serves at least one READY version (models unloaded on purpose do not count).

    A failed hot reload that leaves the old version serving keeps the server ready (its
    reason shows in RepositoryIndex); a model with no READY version makes it unready."""
    with self._lock:
      return all(any(r.state is State.READY for r in vs.values())
                 or all(r.retired for r in vs.values()) for vs in self._models.values())
