"""Per-model serving settings (`<root>/<model>/config.json`) and the factory types the
repository loads through: a table from manifest kind to runner factory, built by the caller."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, Sequence

from bundle import Manifest
from serving.engines import Engine
from serving.engines.cached.config import EmbeddingCacheConfig
from serving.repository.auto_plan import BucketPlanConfig, check_buckets
from serving.repository.traffic import ShadowConfig, TrafficConfig, check_split
from serving.runners import Observer, Runner, RowQueueFactory

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True, slots=True)
class ModelServingConfig:
  """How one model is served; read from `<root>/<model>/config.json`, every field optional."""

  version_policy: str = "latest"  # "latest" (the newest `latest_n`), "all", or "specific"
  latest_n: int = 1
  versions: tuple[int, ...] = ()
  max_queue_delay_us: int | None = None  # None: the bundle's export-time default
  max_queue_rows: int = 65536
  max_queue_requests: int | None = None  # None: bounded by rows only
  default_timeout_us: int | None = None  # deadline for requests that bring none (Triton's
  #                                        default_timeout_microseconds); None: no deadline
  dispatch_when_idle: bool = True
  sharding: str | None = None  # strategy name from sharding/; None: the server default
  devices: int | None = None
  # Which local devices (indices into jax.local_devices()): config.json "devices" as a list. One
  # replica per listed device (or, with `sharding`, the plan over exactly these devices).
  device_ids: tuple[int, ...] | None = None
  instance_count: int | None = None  # batches run at once (Triton's instance_group count);
  #                                    None: the engine's default (2 on CPU, 1 on accelerators)
  nan_policy: str = "pass"  # "error": a request whose own output rows hold a NaN fails INTERNAL
  latency_slo_ms: float | None = None  # latency target: admission, queue-wait bound, batching
  latency_slo_percentile: float = 99.0  # the percentile the target is for (reported)
  max_queue_wait_ms: float = 1000.0  # queue-wait bound without a target; 0: unbounded
  # Embedding tables under a device budget (serving/engines/cached); default: all on device.
  embedding_cache: EmbeddingCacheConfig = dataclasses.field(default_factory=EmbeddingCacheConfig)
  # Canary split of unversioned requests, and a candidate scored beside them (traffic.py).
  traffic: TrafficConfig | None = None
  shadow: ShadowConfig | None = None
  # The batch buckets to compile instead of the bundle's (also what an adopted plan sets), and
  # whether the server re-plans them from traffic (serving/repository/auto_plan.py).
  batch_buckets: tuple[int, ...] | None = None
  bucket_plan: BucketPlanConfig = dataclasses.field(default_factory=BucketPlanConfig)
  adopted_buckets: tuple[int, ...] | None = None  # an adopted plan's (in memory, not config.json)
  # Buckets above the largest compiled at load while batch time stays nearly flat
  # (serving/engines/growth.py): up to this many rows (0: off; None: 4096 on accelerators, off
  # on CPU), each doubling of rows costing at most `auto_bucket_time_ratio` times the time.
  auto_bucket_max_rows: int | None = None
  auto_bucket_time_ratio: float = 1.5
  # Generate models with extend signatures (serving/generation/chunking.py): prefill in chunks
  # under a per-step token budget shared with decodes (None: decode batch + largest chunk), and
  # full KV pages shared by prefix.
  chunked_prefill: bool = True
  max_num_batched_tokens: int | None = None
  prefix_caching: bool = True
  # Speculative decoding (serving/generation/speculative.py): "off", "ngram" (prompt lookup) or
  # "draft" (the generate model `speculative_model` of the same repository drafts), and the
  # draft tokens verified per step (needs the bundle's verify signatures).
  speculative: str = "off"
  num_speculative_tokens: int = 4
  speculative_model: str | None = None

  def __post_init__(self):
    if self.version_policy not in ("latest", "all", "specific"):
      raise ValueError(f"version_policy {self.version_policy!r} must be latest, all or specific")
    if self.latest_n < 1:
      raise ValueError(f"latest_n must be >= 1, got {self.latest_n}")
    if self.version_policy == "specific" and not self.versions:
      raise ValueError("version_policy 'specific' needs a non-empty 'versions' list")
    if self.max_queue_requests is not None and self.max_queue_requests < 1:
      raise ValueError(f"max_queue_requests must be >= 1, got {self.max_queue_requests}")
    if self.default_timeout_us is not None and self.default_timeout_us < 1:
      raise ValueError(f"default_timeout_us must be >= 1, got {self.default_timeout_us}")
    if self.nan_policy not in ("pass", "error"):
      raise ValueError(f"nan_policy {self.nan_policy!r} must be pass or error")
    if self.instance_count is not None and self.instance_count < 1:
      raise ValueError(f"instance_count must be >= 1, got {self.instance_count}")
    if self.latency_slo_ms is not None and not self.latency_slo_ms > 0:
      raise ValueError(f"latency_slo_ms must be > 0, got {self.latency_slo_ms}")
    if not 0 < self.latency_slo_percentile < 100:
      raise ValueError(f"latency_slo_percentile must be in (0, 100), got"
                       f" {self.latency_slo_percentile}")
    if self.device_ids is not None and (not self.device_ids or len(set(self.device_ids))
                                        != len(self.device_ids) or min(self.device_ids) < 0):
      raise ValueError(f"devices {list(self.device_ids)} must list distinct device indices >= 0")
    if not self.max_queue_wait_ms >= 0:
      raise ValueError(f"max_queue_wait_ms must be >= 0 (0: unbounded), got"
                       f" {self.max_queue_wait_ms}")
    if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
      raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
    if self.speculative not in ("off", "ngram", "draft") or self.num_speculative_tokens < 1:
      raise ValueError(f"speculative {self.speculative!r} must be off, ngram or draft, and"
                       f" num_speculative_tokens ({self.num_speculative_tokens}) >= 1")
    if (self.speculative == "draft") != (self.speculative_model is not None):
      raise ValueError("speculative 'draft' and speculative_model go together (the draft"
                       " model's name in the repository)")
    if self.auto_bucket_max_rows is not None and self.auto_bucket_max_rows < 0:
      raise ValueError(f"auto_bucket_max_rows must be >= 0 (0: off), got"
                       f" {self.auto_bucket_max_rows}")
    if not self.auto_bucket_time_ratio > 1:
      raise ValueError(f"auto_bucket_time_ratio must be > 1, got {self.auto_bucket_time_ratio}")
    for name in ("batch_buckets", "adopted_buckets"):
      if getattr(self, name) is not None:
        check_buckets(getattr(self, name), name)
    check_split(self.traffic, self.shadow,
                self.versions if self.version_policy == "specific" else ())

  @classmethod
  def from_json(cls, d: Mapping[str, Any],
                base: ModelServingConfig | None = None) -> ModelServingConfig:
    """The settings `d` names, the others from `base` (the server's defaults) or the class's."""
    known = {f.name for f in dataclasses.fields(cls)} - {"adopted_buckets"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown keys {unknown} (known: {sorted(known)})")
    d = dict(d)
    if "versions" in d:
      d["versions"] = tuple(int(v) for v in d["versions"])
    if isinstance(d.get("devices"), list):  # device indices, not a count
      ids = d.pop("devices")
      if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"devices {ids} must be a list of device indices (integers)")
      d["device_ids"], d["devices"] = tuple(ids), None
      if "instance_count" not in d and (base is None or base.instance_count is None):
        d["instance_count"] = len(ids)  # one batch at a time per listed device
    if "embedding_cache" in d:
      d["embedding_cache"] = EmbeddingCacheConfig.from_json(d["embedding_cache"])
    if d.get("traffic") is not None:
      d["traffic"] = TrafficConfig.from_json(d["traffic"])
    if d.get("shadow") is not None:
      d["shadow"] = ShadowConfig.from_json(d["shadow"])
    if d.get("batch_buckets") is not None:
      d["batch_buckets"] = check_buckets(d["batch_buckets"])
    if "bucket_plan" in d:
      d["bucket_plan"] = BucketPlanConfig.from_json(d["bucket_plan"])
    return dataclasses.replace(base, **d) if base is not None else cls(**d)

  def select(self, available: Sequence[int]) -> list[int]:
    if self.version_policy == "all":
      return list(available)
    if self.version_policy == "specific":
      return [v for v in available if v in self.versions]
    return list(available)[-self.latest_n:]


@dataclasses.dataclass(frozen=True, slots=True)
class LoadSpec:
  """One model version to load, as a runner factory gets it."""

  path: pathlib.Path
  manifest: Manifest
  config: ModelServingConfig
  name: str  # "<model>/<version>", for logs and thread names
  observer: Observer
  progress: Callable[[str], None]
  row_queue: RowQueueFactory | None = None  # native batch queues for plain batched models
  # (model, version or None) -> that model's READY runner (pipelines call other models)
  models: Callable[[str, "int | None"], Runner] | None = None
  # Marks compiles on the calling thread as warm-up (for work a runner compiles later, off the
  # request path: a pipeline's device hand-off copies).
  warming: Callable[[], Any] | None = None


RunnerFactory = Callable[[LoadSpec], Runner]  # builds, warms up and returns an unstarted runner
EngineFactory = Callable[[pathlib.Path, Manifest, ModelServingConfig], Engine]
