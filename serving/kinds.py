"""The table from manifest kind to runner factory that a server loads models through.

The serving core never branches on a model's kind: the repository looks the kind up in this
table, and the server registers each kind's metrics collector. `standard_kinds` is what the
CLI passes: batched predict models (row, sequence and context runners over an engine),
generative models (continuous batching over a paged KV cache) and pipelines (steps over the
other served models).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterable

from bundle import BundleError
from serving.batching import BatchingConfig
from serving.engines import Engine
from serving.engines.base import export_platform
from serving.engines.growth import GrowthConfig, growth_limit, is_flat
from serving.repository import (EngineFactory, LoadSpec, ModelServingConfig, RunnerFactory,
                                default_engine_factory)
from serving.repository.bucket_override import serving_manifest
from serving.runners import Runner, make_runner

MetricsFactory = Callable[[Callable[[], Iterable[tuple[str, Runner]]]], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ModelKind:
  """How models of one manifest kind load, and (optionally) a Prometheus collector over the
  runners of that kind: `metrics(runners)` where `runners()` lists (label, runner)."""

  load: RunnerFactory
  metrics: MetricsFactory | None = None


def predict_runner_factory(engine_factory: EngineFactory) -> RunnerFactory:
  """Predict bundles: an engine compiled for every bucket, behind a row or sequence runner."""
  def load(spec: LoadSpec) -> Runner:
    manifest = serving_manifest(spec.manifest, spec.config, export_platform())  # batch_buckets
    engine: Engine = engine_factory(spec.path, manifest, spec.config)
    try:
      engine.warmup(progress=spec.progress)
      _grow_or_advise(engine, spec.config, spec.progress)
      cfg = spec.config
      delay_us = (cfg.max_queue_delay_us if cfg.max_queue_delay_us is not None
                  else int(spec.manifest.serving.get("max_queue_delay_us", 2000)))
      batching = BatchingConfig(buckets=tuple(engine.buckets), max_queue_delay_s=delay_us / 1e6,
                                dispatch_when_idle=cfg.dispatch_when_idle,
                                max_queue_rows=max(cfg.max_queue_rows, engine.buckets[-1]),
                                max_queue_requests=cfg.max_queue_requests,
                                latency_slo_s=(None if cfg.latency_slo_ms is None
                                               else cfg.latency_slo_ms / 1e3),
                                max_queue_wait_s=(cfg.max_queue_wait_ms / 1e3
                                                  if cfg.max_queue_wait_ms > 0 else None))
      return make_runner(spec.name, engine, batching, observer=spec.observer,
                         instances=cfg.instance_count, row_queue=spec.row_queue,
                         nan_policy=cfg.nan_policy)
    except BaseException:
      engine.close()  # give back what a half-finished warm-up allocated
      raise
  return load


def _grow_or_advise(engine: Engine, cfg: ModelServingConfig, say: Callable[[str], None]) -> None:
  """Grows the largest bucket while batch time stays nearly flat (serving/engines/growth.py),
  unless the buckets were chosen (batch_buckets, a bucket plan) or growth is off; else says
  when larger buckets would pay."""
  limit = growth_limit(cfg.auto_bucket_max_rows, export_platform())
  chosen = (cfg.batch_buckets is not None or cfg.adopted_buckets is not None
            or cfg.bucket_plan.auto)
  grow = getattr(engine, "grow_buckets", None)  # plain row engines
  if limit > 0 and not chosen and grow is not None and engine.buckets[-1] < limit:
    grow(GrowthConfig(limit, cfg.auto_bucket_time_ratio), say)
    return
  seconds = engine.bucket_seconds
  if is_flat(seconds):
    lo, hi = min(seconds), max(seconds)
    say(f"batch time is nearly flat: {seconds[hi] * 1e3:.2f} ms at {hi} rows vs"
        f" {seconds[lo] * 1e3:.2f} ms at {lo}; larger buckets would pay: set"
        f" auto_bucket_max_rows in config.json (or --auto-bucket-max-rows) or export with"
        f" larger batch_buckets")


def generate_runner_factory(spec: LoadSpec) -> Runner:
  """Generate bundles: a GenerationService (every shape compiled at load) behind its runner."""
  from serving.generation.runner import load_generation_runner
  from serving.repository.placement import configured_devices
  from serving.generation.service import ServiceConfig
  from serving.generation.speculative import SpeculativeConfig

  cfg = spec.config
  speculative = None if cfg.speculative == "off" else SpeculativeConfig(
      cfg.speculative, cfg.num_speculative_tokens)
  return load_generation_runner(spec.path, spec.name, observer=spec.observer,
                                progress=spec.progress, draft_path=draft_path(
                                    spec.path, cfg.speculative_model), config=ServiceConfig(
                                    chunked_prefill=cfg.chunked_prefill,
                                    max_num_batched_tokens=cfg.max_num_batched_tokens,
                                    prefix_caching=cfg.prefix_caching,
                                    speculative=speculative),
                                sharding=cfg.sharding,
                                devices=configured_devices(cfg, spec.manifest.name))


def draft_path(bundle: pathlib.Path, name: str | None) -> pathlib.Path | None:
  """The newest version folder of model `name` beside `bundle` (<repo>/<model>/<version>)."""
  if name is None:
    return None
  versions = sorted((int(p.name), p) for p in (bundle.parent.parent / name).glob("*")
                    if p.name.isdigit() and p.is_dir())
  if not versions:
    raise BundleError(f"speculative model {name!r} has no version folder in the repository")
  return versions[-1][1]


def generation_metrics(runners: Callable[[], Iterable[tuple[str, Runner]]]) -> Any:
  """The token-level collector (TTFT, TPOT, KV pages) over the generation runners."""
  from serving.generation.metrics import GenerationCollector

  return GenerationCollector(lambda: [(label, r.service) for label, r in runners()])


def pipeline_runner_factory(spec: LoadSpec) -> Runner:
  """Pipelines: steps over the other served models (looked up per request) and host ops."""
  from serving.runners.pipeline import PipelineRunner

  if spec.models is None:
    raise ValueError(f"{spec.name}: pipelines need a repository to look their steps up in")
  return PipelineRunner(spec.name.split("/")[0], spec.manifest, spec.models,
                        observer=spec.observer, warming=spec.warming)


def embedding_metrics(runners: Callable[[], Iterable[tuple[str, Runner]]]) -> Any:
  """Per-table embedding cache counters of the predict models that have a cache."""
  from serving.telemetry.embedding_metrics import EmbeddingCacheCollector

  return EmbeddingCacheCollector(runners)


def pipeline_metrics(runners: Callable[[], Iterable[tuple[str, Runner]]]) -> Any:
  """Per-step counts and seconds of every pipeline."""
  from serving.telemetry.pipeline_metrics import PipelineCollector

  return PipelineCollector(runners)


def standard_kinds(engine_factory: EngineFactory | None = None) -> dict[str, ModelKind]:
  """Every kind xlaserve serves; predict engines come from `engine_factory` (placement)."""
  return {"predict": ModelKind(predict_runner_factory(engine_factory or default_engine_factory()),
                               embedding_metrics),
          "generate": ModelKind(generate_runner_factory, generation_metrics),
          "pipeline": ModelKind(pipeline_runner_factory, pipeline_metrics)}


def runner_factories(engine_factory: EngineFactory | None = None) -> dict[str, RunnerFactory]:
  """The load half of `standard_kinds`, as `ModelRepository(kinds=...)` takes it."""
  return {kind: spec.load for kind, spec in standard_kinds(engine_factory).items()}
