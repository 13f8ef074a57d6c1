"""Chooses where each model version runs: devices and sharding plan, from its serving config."""

from __future__ import annotations

from typing import Sequence

from export.bundle import Manifest
from serving.engine import Placement
from serving.repository import EngineFactory, ModelServingConfig, default_engine_factory


def placements_for(cfg: ModelServingConfig, manifest: Manifest) -> Sequence[Placement] | None:
  """Single device unless the config names a strategy or a device count."""
  if cfg.sharding is None and (cfg.devices is None or cfg.devices == 1):
    return None
  raise NotImplementedError("sharded placement is being wired in (sharding/)")


def engine_factory_for(server_config) -> EngineFactory:
  return default_engine_factory(placements_for)
