"""Chooses where each model version runs: devices and sharding plan, from its serving config.

The plan comes from `sharding/` (rules as data); the bundle's manifest gives each
parameter's logical axes, so placing a model never needs its code.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Callable, Sequence

from bundle import BundleError, Manifest
from serving.engines import BundleEngine, ContextEngine, Engine, Placement, SeqBundleEngine
from serving.engines.tablewise import require_lookup
from serving.repository.config import EngineFactory, ModelServingConfig

logger = logging.getLogger(__name__)


def placements_for(cfg: ModelServingConfig, manifest: Manifest) -> Sequence[Placement] | None:
  """Single device unless the config names a strategy, more than one device, or which devices
  (`devices` as a list: one replica on each, or the strategy's plan over exactly those)."""
  devices = configured_devices(cfg, manifest.name)
  if devices is None:
    return None
  from sharding import ShardingPlan

  strategy = cfg.sharding or "replicated"
  plan = ShardingPlan.create(strategy, len(devices), devices)
  axes = [p.logical_axes for p in manifest.params]
  shapes = [p.shape for p in manifest.params]
  try:
    tables = plan.table_placement(axes, shapes)
  except ValueError as e:
    raise BundleError(f"{manifest.name}: {e}") from e
  if tables is not None:  # whole tables on single devices: the bundle's lookup split runs them
    require_lookup(manifest, strategy)
  out = []
  for mesh, p in plan.placements():
    out.append(Placement(
        devices=tuple(mesh.devices.flat),
        param_shardings=lambda specs, p=p: p.param_shardings(
            [s.logical_axes for s in specs], [s.shape for s in specs]),
        batch_sharding=lambda ndim, bucket=None, p=p: p.input_sharding(ndim, batch=bucket),
        label=f"{strategy} mesh {dict(mesh.shape)}", tables=tables, mesh=mesh))
  logger.info("%s: %d placement(s) under %s", manifest.name, len(out), strategy)
  return out


def configured_devices(cfg: ModelServingConfig, model: str) -> list[Any] | None:
  """The local devices a model's config asks for (`devices` N: the first N; a list: those);
  None when it names no strategy and at most one device (the default device)."""
  if cfg.sharding is None and cfg.device_ids is None and (cfg.devices is None or cfg.devices == 1):
    return None
  import jax

  available = jax.local_devices()
  if cfg.device_ids is not None:
    return listed_devices(cfg.device_ids, available, model)
  n = cfg.devices or len(available)
  if n > len(available):
    raise BundleError(f"{model}: {n} devices requested, {len(available)} present"
                      " (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return available[:n]


def listed_devices(ids: Sequence[int], available: Sequence[Any], model: str) -> list[Any]:
  """The local devices `ids` names (indices into jax.local_devices()); a BundleError naming
  the indices that do not exist."""
  missing = [i for i in ids if i >= len(available)]
  if missing:
    raise BundleError(f"{model}: config.json devices {list(ids)} names device(s) {missing}, but"
                      f" this host has {len(available)} {available[0].platform} device(s)"
                      f" (indices 0..{len(available) - 1})")
  return [available[i] for i in ids]


def cached_engine(path: pathlib.Path, manifest: Manifest, sig: str,
                  cfg: ModelServingConfig) -> Engine | None:
  """A CachedTablesEngine when the config sets an embedding budget and some table does not fit
  it; None to serve the bundle as usual (no budget, no categorical tables, or all tables fit)."""
  from serving.engines.cached import CachedTablesEngine, plan_tables

  cache = cfg.embedding_cache
  signature = manifest.signatures.get(sig)
  if not cache.enabled or signature is None or manifest.kind != "predict":
    return None
  if signature.table_lookup is None:
    if cache.cache_ratios:  # named tables a model does not have: say so; a server default is moot
      raise BundleError(f"{manifest.name}: embedding_cache names tables but signature {sig!r}"
                        " has no categorical tables to cache")
    return None
  if cfg.sharding is not None or (cfg.devices or 1) > 1 or len(cfg.device_ids or ()) > 1:
    raise BundleError(f"{manifest.name}: embedding_cache serves a model on one device; drop"
                      " sharding/devices from its config, or drop embedding_cache")
  try:
    plans = plan_tables(signature.table_lookup, manifest.params, cache)
  except ValueError as e:
    raise BundleError(f"{manifest.name}: {e}") from e
  if all(p.cache_rows is None for p in plans):
    logger.info("%s: every embedding table fits the device budget; no cache", manifest.name)
    return None
  device = None
  if cfg.device_ids:
    import jax
    device = listed_devices(cfg.device_ids, jax.local_devices(), manifest.name)[0]
  return CachedTablesEngine(path, manifest=manifest, signature=sig, config=cache, device=device)


def default_engine_factory(placements: Callable[[ModelServingConfig, Manifest], Sequence[Placement]]
                           | None = None) -> EngineFactory:
  """Predict bundles -> BundleEngine, SeqBundleEngine (batch x sequence grid) for a
  signature with a "seq" dimension, or ContextEngine for one with context inputs; placed by `placements` (single device by default)."""
  def make(path: pathlib.Path, manifest: Manifest, cfg: ModelServingConfig) -> Engine:
    sig = next(iter(manifest.signatures)) if len(manifest.signatures) == 1 else "serve"
    if (cached := cached_engine(path, manifest, sig, cfg)) is not None:
      return cached
    where = placements(cfg, manifest) if placements else None
    if sig in manifest.signatures and manifest.signatures[sig].has_seq:
      return SeqBundleEngine(path, manifest=manifest, signature=sig, placements=where)
    if sig in manifest.signatures and manifest.signatures[sig].context is not None:
      return ContextEngine(path, manifest=manifest, signature=sig, placements=where)
    return BundleEngine(path, manifest=manifest, signature=sig, placements=where)
  return make


def engine_factory_for() -> EngineFactory:
  """The engine factory the CLI uses: bundles placed by their serving config."""
  return default_engine_factory(placements_for)
