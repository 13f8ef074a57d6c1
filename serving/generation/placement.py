"""Where a generate bundle lives: one device, or a tensor-parallel mesh (`--sharding tensor`).

Params take the shardings the `sharding/` rules give their logical axes (from the manifest):
attention heads and MLP columns split over the `model` axis, the Megatron way, so each layer
needs two all-reduces. The paged KV cache [layers, kv_heads, num_pages, page_size, head_dim]
(and int8 scales) splits on `kv_heads`, so each device holds the pages of its own heads; page
tables, tokens, sampling inputs and outputs are replicated. A dimension that does not divide
the mesh is replicated (the plan logs it). The exported StableHLO is single-device: inside a
jit over the mesh, XLA's partitioner propagates these shardings through it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

from jax.sharding import NamedSharding, PartitionSpec as P

from bundle import BundleError, Manifest
from sharding import ShardingPlan
from sharding.mesh import single_device_mesh
from sharding.rules import MODEL, mesh_axes_of, rules_for

logger = logging.getLogger(__name__)

# Strategies a generate bundle can be served under (the others are for embedding models).
LM_STRATEGIES: tuple[str, ...] = ("replicated", "tensor")


@dataclasses.dataclass(frozen=True, slots=True)
class LMPlacement:
  """A mesh and the shardings of a generate bundle's params and KV cache arrays on it."""

  mesh: Any  # jax.sharding.Mesh (data x model)
  params: tuple[NamedSharding, ...]  # one per manifest param, in order
  cache: Mapping[str, NamedSharding]  # KV cache array name -> its sharding
  label: str = "single device"

  @property
  def replicated(self) -> NamedSharding:
    """Tokens, page tables, sampling inputs and every output."""
    return NamedSharding(self.mesh, P())

  @property
  def devices(self) -> tuple[Any, ...]:
    return tuple(self.mesh.devices.flat)

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size


def single_placement(manifest: Manifest, device: Any) -> LMPlacement:
  """Everything on `device` (a 1 x 1 mesh)."""
  mesh = single_device_mesh(device)
  whole = NamedSharding(mesh, P())
  return LMPlacement(mesh, (whole,) * len(manifest.params),
                     {k: whole for k in manifest.extra.get("kv_cache", {})})


def lm_placement(manifest: Manifest, *, strategy: str | None, devices: Sequence[Any]
                 ) -> LMPlacement:
  """The placement of a generate bundle on `devices` under `strategy` ("tensor"; None,
  "replicated", or one device: the first device; a strategy for embedding models is logged and
  ignored, since a server-wide --sharding names one for its CTR models). On a bundle without
  logical axes the params (or the cache) are replicated, with a log line saying so."""
  if not devices:
    raise BundleError(f"{manifest.name}: no devices to place it on")
  if strategy is not None and strategy not in LM_STRATEGIES:
    logger.warning("%s: sharding %r does not apply to a generate model (it takes %s); serving"
                   " it on one device", manifest.name, strategy, " or ".join(LM_STRATEGIES))
    strategy = None
  if strategy in (None, "replicated") or len(devices) == 1:
    if len(devices) > 1:
      logger.info("%s: generate models are not replicated across devices; serving on %s only"
                  " (use --sharding tensor to use all %d)", manifest.name, devices[0],
                  len(devices))
    return single_placement(manifest, devices[0])
  plan = ShardingPlan.create(strategy, len(devices), list(devices))
  axes = [p.logical_axes for p in manifest.params]
  if all(a is None for a in axes):
    logger.warning("%s: the manifest records no logical axes for its params; they are"
                   " replicated on all %d devices (re-export the model to shard them)",
                   manifest.name, len(devices))
  params = plan.param_shardings(axes, [p.shape for p in manifest.params])
  cache = {}
  for name, entry in manifest.extra.get("kv_cache", {}).items():
    cache_axes = entry.get("logical_axes")
    if cache_axes is None:
      logger.warning("%s: the manifest records no logical axes for KV cache array %r; it is"
                     " replicated on all %d devices (re-export the model to shard it by kv"
                     " heads)", manifest.name, name, len(devices))
    cache[name] = plan.sharding_for(None if cache_axes is None else tuple(cache_axes),
                                    tuple(entry["shape"]))
  split = [n for n, s in cache.items() if any(MODEL in mesh_axes_of(e) for e in s.spec)]
  whole = _replicated_dims(plan, [*axes, *(e.get("logical_axes") for e in
                                           manifest.extra.get("kv_cache", {}).values())],
                           [*(p.shape for p in manifest.params), *(
                               e["shape"] for e in manifest.extra.get("kv_cache", {}).values())],
                           [*params, *cache.values()])
  label = (f"{manifest.name}: {strategy} over {len(devices)} devices; KV cache "
           + (f"split by kv heads ({', '.join(split)})" if split else "replicated")
           + (f"; replicated where they do not divide {len(devices)}: {', '.join(whole)}"
              if whole else ""))
  logger.info("%s", label)
  return LMPlacement(plan.mesh, tuple(params), cache, label)


def _replicated_dims(plan: ShardingPlan, axes: Sequence[Any], shapes: Sequence[Any],
                     shardings: Sequence[NamedSharding]) -> list[str]:
  """"name (size)" of every logical axis the rules split that stayed whole (did not divide)."""
  rules = rules_for(plan.strategy)
  out: list[str] = []
  for names, shape, sh in zip(axes, shapes, shardings):
    for dim, name in enumerate(names or ()):
      spec = tuple(sh.spec) + (None,) * len(shape)
      if name is not None and mesh_axes_of(rules.get(name)) and spec[dim] is None:
        item = f"{name} ({shape[dim]})"
        out += [item] if item not in out else []
  return out
