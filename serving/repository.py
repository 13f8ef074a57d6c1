"""The model repository: finds bundles on disk, loads the versions a policy selects, tracks their state.

Layout: `<root>/<model>/<version>/` bundles, plus an optional `<root>/<model>/config.json`
(a ModelServingConfig: version policy, batching, sharding). A model whose load
fails is marked UNAVAILABLE with the reason; every other model keeps serving.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import pathlib
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from export import bundle as bundle_lib
from export.bundle import BundleError, Manifest
from serving.batching import BatchingConfig
from serving.compile_watch import CompileCounter
from serving.engine import BundleEngine, Engine, Placement
from serving.runner import Deliver, ModelRunner, Observer, deliver_inline
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelServingConfig:
  """How one model is served; read from `<root>/<model>/config.json`, every field optional."""

  version_policy: str = "latest"  # "latest" (the newest `latest_n`), "all", or "specific"
  latest_n: int = 1
  versions: tuple[int, ...] = ()
  max_queue_delay_us: int | None = None  # None: the bundle's export-time default
  max_queue_rows: int = 65536
  dispatch_when_idle: bool = True
  sharding: str | None = None  # strategy name from sharding/; None: the server default
  devices: int | None = None

  def __post_init__(self):
    if self.version_policy not in ("latest", "all", "specific"):
      raise ValueError(f"version_policy {self.version_policy!r} must be latest, all or specific")
    if self.latest_n < 1:
      raise ValueError(f"latest_n must be >= 1, got {self.latest_n}")
    if self.version_policy == "specific" and not self.versions:
      raise ValueError("version_policy 'specific' needs a non-empty 'versions' list")

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ModelServingConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
    d = dict(d)
    if "versions" in d:
      d["versions"] = tuple(int(v) for v in d["versions"])
    return cls(**d)

  def select(self, available: Sequence[int]) -> list[int]:
    if self.version_policy == "all":
      return list(available)
    if self.version_policy == "specific":
      return [v for v in available if v in self.versions]
    return list(available)[-self.latest_n:]


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
  runner: ModelRunner | None = None
  config: ModelServingConfig = dataclasses.field(default_factory=ModelServingConfig)
  load_s: float = 0.0


EngineFactory = Callable[[pathlib.Path, Manifest, ModelServingConfig], Engine]
ObserverFactory = Callable[[str, int], Observer]


def default_engine_factory(placements: Callable[[ModelServingConfig, Manifest], Sequence[Placement]]
                           | None = None) -> EngineFactory:
  """Predict bundles -> BundleEngine, placed by `placements` (single device by default)."""
  def make(path: pathlib.Path, manifest: Manifest, cfg: ModelServingConfig) -> Engine:
    return BundleEngine(path, manifest=manifest,
                        placements=placements(cfg, manifest) if placements else None)
  return make


class ModelRepository:
  """Loads and serves the models under `root`; thread-safe lookups."""

  def __init__(
      self,
      root: str | pathlib.Path,
      *,
      engine_factory: EngineFactory | None = None,
      observer_factory: ObserverFactory | None = None,
      deliver: Deliver = deliver_inline,
      compile_counter: CompileCounter | None = None,
      default_config: ModelServingConfig = ModelServingConfig(),
  ):
    self.root = pathlib.Path(root).resolve()
    if not self.root.is_dir():
      raise FileNotFoundError(f"model repository {self.root} does not exist; create it or pass"
                              " --model-repository pointing at exported bundles")
    self.engine_factory = engine_factory or default_engine_factory()
    self.observer_factory = observer_factory or (lambda name, version: Observer())
    self.deliver = deliver
    self.compiles = compile_counter or CompileCounter()
    self.default_config = default_config
    self._lock = threading.RLock()
    self._models: dict[str, dict[int, ServedVersion]] = {}
    self._engines: dict[tuple[str, int], Engine] = {}
    self._defaults: dict[str, ServedVersion] = {}  # newest READY version, rebuilt on changes

  def _refresh_defaults(self) -> None:
    """Recomputes the default-version table (call with the lock held); swapped atomically."""
    table = {}
    for name, versions in self._models.items():
      ready = [r for _, r in sorted(versions.items()) if r.state is State.READY]
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
    if not MODEL_NAME_RE.match(name) or name in (".", ".."):
      raise ServingError(Code.INVALID_ARGUMENT, f"invalid model name {name!r}: use letters,"
                         " digits, '_', '-' and '.' only")

  def model_dir(self, name: str) -> pathlib.Path:
    """The folder of model `name`, refusing names that would leave the repository."""
    self.check_name(name)
    path = (self.root / name).resolve()
    if path.parent != self.root:
      raise ServingError(Code.INVALID_ARGUMENT, f"invalid model name {name!r}")
    return path

  def discover(self) -> list[str]:
    return sorted(p.name for p in self.root.iterdir()
                  if p.is_dir() and MODEL_NAME_RE.match(p.name) and bundle_lib.list_versions(p))

  def read_config(self, name: str) -> ModelServingConfig:
    path = self.model_dir(name) / CONFIG_FILE
    if not path.exists():
      return self.default_config
    try:
      return ModelServingConfig.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
      raise BundleError(f"{path}: {e}") from e

  def load_all(self, progress: Callable[[str], None] | None = None) -> None:
    """Loads every model found under the root (failures are recorded, not raised)."""
    for name in self.discover():
      self.load(name, progress=progress)

  def load(self, name: str, progress: Callable[[str], None] | None = None) -> list[ServedVersion]:
    """Loads the versions of `name` its policy selects; returns their records."""
    say = progress or (lambda msg: None)
    model_dir = self.model_dir(name)
    try:
      cfg = self.read_config(name)
      wanted = cfg.select(bundle_lib.list_versions(model_dir))
      if not wanted:
        raise BundleError(f"no version of {name} under {model_dir} matches policy"
                          f" {cfg.version_policy}")
    except BundleError as e:
      rec = ServedVersion(name, 0, State.UNAVAILABLE, str(e))
      with self._lock:
        self._models.setdefault(name, {})[0] = rec
      say(f"{name}: UNAVAILABLE: {e}")
      return [rec]
    return [self._load_version(name, v, cfg, say) for v in wanted]

  def _load_version(self, name: str, version: int, cfg: ModelServingConfig,
                    say: Callable[[str], None]) -> ServedVersion:
    rec = ServedVersion(name, version, State.LOADING, config=cfg)
    with self._lock:
      self._models.setdefault(name, {}).pop(0, None)
      self._models[name].setdefault(version, rec)
      rec = self._models[name][version]
      if rec.state is State.READY:
        return rec
      rec.state, rec.config = State.LOADING, cfg
    t0 = time.perf_counter()
    path = self.model_dir(name) / str(version)
    try:
      manifest = bundle_lib.read_manifest(path)
      if manifest.name != name or manifest.version != version:
        logger.warning("%s: manifest says %s/%s; serving it as %s/%s", path, manifest.name,
                       manifest.version, name, version)
      with self.compiles.warming():
        engine = self.engine_factory(path, manifest, cfg)
        engine.warmup(progress=lambda msg: say(f"{name}/{version}: {msg}"))
      delay_us = (cfg.max_queue_delay_us if cfg.max_queue_delay_us is not None
                  else int(manifest.serving.get("max_queue_delay_us", 2000)))
      batching = BatchingConfig(buckets=tuple(engine.buckets), max_queue_delay_s=delay_us / 1e6,
                                dispatch_when_idle=cfg.dispatch_when_idle,
                                max_queue_rows=max(cfg.max_queue_rows, engine.buckets[-1]))
      runner = ModelRunner(f"{name}/{version}", engine, batching, deliver=self.deliver,
                           observer=self.observer_factory(name, version))
      runner.start()
    except Exception as e:  # any failure isolates this version only
      logger.exception("loading %s/%s failed", name, version)
      with self._lock:
        rec.state, rec.reason = State.UNAVAILABLE, f"load failed: {type(e).__name__}: {e}"
      say(f"{name}/{version}: UNAVAILABLE: {rec.reason}")
      return rec
    with self._lock:
      rec.manifest, rec.runner, rec.load_s = manifest, runner, time.perf_counter() - t0
      rec.state, rec.reason = State.READY, ""
      self._engines[(name, version)] = engine
      self._refresh_defaults()
    say(f"{name}/{version}: READY in {rec.load_s:.2f}s")
    return rec

  def unload(self, name: str, version: int | None = None, *, drain: bool = True) -> None:
    """Stops serving `name` (one version or all); queued requests are answered when draining."""
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
      engine = self._engines.pop((rec.name, rec.version), None)
      if engine is not None:
        engine.close()
      with self._lock:
        rec.state, rec.reason, rec.runner = State.UNAVAILABLE, "unloaded", None

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
        ready = [r for v, r in sorted(versions.items()) if r.state is State.READY]
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

  def records(self) -> list[ServedVersion]:
    with self._lock:
      return [r for name in sorted(self._models) for _, r in sorted(self._models[name].items())]

  def versions_of(self, name: str) -> list[ServedVersion]:
    with self._lock:
      return [r for _, r in sorted(self._models.get(name, {}).items())]

  @property
  def all_ready(self) -> bool:
    with self._lock:
      return all(r.state is State.READY for vs in self._models.values() for r in vs.values())
