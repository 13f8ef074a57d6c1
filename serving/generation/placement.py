"""Where a generate bundle lives: one device, or a tensor-parallel mesh (`--sharding tensor`).

Params take the shardings the `sharding/` rules give their logical axes (from the manifest):
attention heads and MLP columns split over the `model` axis, the Megatron way, so each layer
needs two all-reduces. The paged KV cache [layers, kv_heads, num_pages, page_size, head_dim]
(and int8 scales) splits on `kv_heads`, so each device holds the pages of its own heads; page
tables, tokens, sampling inputs and outputs are replicated. A dimension that does not divide
the mesh is replicated (the placement's label, printed at load, names it); when the kv heads do
not divide, the query heads stay whole too (each query head must sit with its kv head, or the
partitioner gathers the cache every step), so attention is replicated and the MLP still splits.
The exported StableHLO is single-device: inside a jit over the mesh, XLA's partitioner
propagates these shardings through it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
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
  kv_cache = manifest.extra.get("kv_cache", {})
  axes = [p.logical_axes for p in manifest.params]
  cache_axes = [None if e.get("logical_axes") is None else tuple(e["logical_axes"])
                for e in kv_cache.values()]
  shapes = [*(tuple(p.shape) for p in manifest.params), *(tuple(e["shape"])
                                                          for e in kv_cache.values())]
  if all(a is None for a in axes):
    logger.warning("%s: the manifest records no logical axes for its params; they are"
                   " replicated on all %d devices (re-export the model to shard them)",
                   manifest.name, len(devices))
  for name, a in zip(kv_cache, cache_axes):
    if a is None:
      logger.warning("%s: the manifest records no logical axes for KV cache array %r; it is"
                     " replicated on all %d devices (re-export the model to shard it by kv"
                     " heads)", manifest.name, name, len(devices))
  every = [*axes, *cache_axes]
  whole = _replicated_dims(plan, every, shapes)
  if any(w.startswith("kv_heads ") for w in whole):  # GQA: query heads go with their kv head
    every = [None if a is None else tuple(None if n in ("heads", "kv_heads") else n for n in a)
             for a in every]
    whole = [*(w for w in whole if w.startswith("kv_heads ")), "heads (with their kv heads)",
             *(w for w in whole if not w.startswith("kv_heads "))]
  shardings = [plan.sharding_for(a, shape) for a, shape in zip(every, shapes)]
  cache = dict(zip(kv_cache, shardings[len(axes):]))
  split = [n for n, sh in cache.items() if any(MODEL in mesh_axes_of(e) for e in sh.spec)]
  label = (f"{manifest.name}: {strategy} over {len(devices)} devices; KV cache "
           + (f"split by kv heads ({', '.join(split)})" if split else "replicated")
           + (f"; replicated where they do not divide {len(devices)}: {', '.join(whole)}"
              if whole else ""))
  logger.info("%s", label)
  return LMPlacement(plan.mesh, tuple(shardings[:len(axes)]), cache, label)


def _replicated_dims(plan: ShardingPlan, axes: Sequence[Any], shapes: Sequence[Any]
                     ) -> list[str]:
  """"name (size)" of every logical axis the rules split that does not divide the mesh axes."""
  rules = rules_for(plan.strategy)
  out: list[str] = []
  for names, shape in zip(axes, shapes):
    for name, size in zip(names or (), shape):
      mesh = mesh_axes_of(rules.get(name)) if name is not None else ()
      if mesh and size % math.prod(plan.mesh.shape[m] for m in mesh):
        item = f"{name} ({size})"
        out += [item] if item not in out else []
  return out
