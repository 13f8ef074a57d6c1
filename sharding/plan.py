"""ShardingPlan: a strategy's rules bound to a mesh, applied to concrete parameter shapes.

The serving engine has, per flat parameter leaf, its logical axes (or None) and shape; the plan
turns them into NamedShardings (restore targets and jit in_shardings) and gives the shardings of
batch-major inputs and outputs. Table-wise embedding sharding (`embedding_tables`) of separate
per-feature tables goes through `TablePlacement` (sharding/tables.py), which fuses them into one
row-sharded array whose per-device blocks hold whole tables.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import make_mesh, single_device_mesh
from sharding.rules import MESH_AXES, mesh_axes_of, rules_for
from sharding.tables import TablePlacement

logger = logging.getLogger(__name__)

LogicalAxes = tuple[str | None, ...] | None


@dataclasses.dataclass(frozen=True, slots=True)
class ShardingPlan:
  """A strategy (see `sharding.rules`) on a (`data`, `model`) mesh."""

  strategy: str
  mesh: Mesh

  def __post_init__(self):
    rules_for(self.strategy)
    if tuple(self.mesh.axis_names) != MESH_AXES:
      raise ValueError(f"mesh axes must be {MESH_AXES}, got {self.mesh.axis_names}")

  @classmethod
  def create(
      cls, strategy: str, num_devices: int, devices: Sequence[jax.Device] | None = None, *,
      data: int | None = None,
  ) -> ShardingPlan:
    """`ShardingPlan(strategy, make_mesh(strategy, num_devices, devices, data=data))`."""
    return cls(strategy, make_mesh(strategy, num_devices, devices, data=data))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  # ---- logical axes -> PartitionSpec ------------------------------------------------------
  def _resolve(
      self, logical_axes: LogicalAxes, shape: Sequence[int] | None
  ) -> tuple[P, list[str]]:
    if logical_axes is None:
      return P(), []
    if shape is not None and len(shape) != len(logical_axes):
      raise ValueError(f"logical axes {logical_axes} and shape {tuple(shape)} differ in rank")
    rules = rules_for(self.strategy)
    used: set[str] = set()
    spec: list[Any] = []
    fallbacks: list[str] = []
    for dim, name in enumerate(logical_axes):
      if name is None:
        spec.append(None)
        continue
      if name not in rules:
        raise ValueError(f"logical axis {name!r} (in {logical_axes}) has no rule in"
                         f" {self.strategy!r}; known: {tuple(rules)}")
      axes = mesh_axes_of(rules[name])
      if not axes:
        spec.append(None)
        continue
      if used & set(axes):
        fallbacks.append(f"dim {dim} ({name}): mesh axes {axes} already used in this array")
        spec.append(None)
        continue
      size = math.prod(self.mesh.shape[a] for a in axes)
      if shape is not None and shape[dim] % size:
        fallbacks.append(f"dim {dim} ({name}) of size {shape[dim]} does not divide {axes}={size}")
        spec.append(None)
        continue
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec), fallbacks

  def spec_for(self, logical_axes: LogicalAxes, shape: Sequence[int] | None = None) -> P:
    """PartitionSpec of an array with these logical axes; None (no metadata) is replicated.

    With `shape`, a dimension that does not divide its mesh axes is replicated (logged); a mesh
    axis is used at most once per array (a later dimension naming it is replicated, logged).
    """
    spec, fallbacks = self._resolve(logical_axes, shape)
    for f in fallbacks:
      logger.info("%s: %s %s replicated: %s", self.strategy, logical_axes, tuple(shape or ()), f)
    return spec

  def sharding_for(
      self, logical_axes: LogicalAxes, shape: Sequence[int] | None = None
  ) -> NamedSharding:
    """`NamedSharding(mesh, spec_for(logical_axes, shape))`."""
    return NamedSharding(self.mesh, self.spec_for(logical_axes, shape))

  def param_shardings(
      self, logical_axes_list: Sequence[LogicalAxes], shapes: Sequence[Sequence[int]]
  ) -> list[NamedSharding]:
    """One NamedSharding per flat parameter leaf (restore targets and jit in_shardings).

    Under `embedding_tables`, each separate table (axes ("table_rows", ...)) gets its home: a
    1-device mesh on the device `table_placement` chose (an 8-bit table's per-row scale and
    offset go with it). That is a restore target, not a jit
    input: fuse the tables with `TablePlacement.fuse` (which is jit-friendly) before serving.
    """
    if len(logical_axes_list) != len(shapes):
      raise ValueError(f"{len(logical_axes_list)} logical axes but {len(shapes)} shapes")
    homes: dict[int, NamedSharding] = {}
    placement = self.table_placement(logical_axes_list, shapes)
    if placement is not None:
      devices = self.mesh.devices.reshape(-1)
      for f, (leaf, shard) in enumerate(zip(placement.leaf_index, placement.shard)):
        home = NamedSharding(single_device_mesh(devices[shard]), P())
        for i in (leaf, *(placement.side[f] if placement.side else ())):
          homes[i] = home
    out: list[NamedSharding] = []
    fallbacks: list[str] = []
    for i, (axes, shape) in enumerate(zip(logical_axes_list, shapes)):
      if i in homes:
        out.append(homes[i])
        continue
      spec, fb = self._resolve(axes, shape)
      fallbacks += [f"leaf {i} {tuple(shape)}: {f}" for f in fb]
      out.append(NamedSharding(self.mesh, spec))
    if fallbacks:
      logger.warning("%s on %s: %d dimension(s) replicated because they do not divide the mesh:"
                     " %s", self.strategy, dict(self.mesh.shape), len(fallbacks),
                     "; ".join(fallbacks[:8]) + (" ..." if len(fallbacks) > 8 else ""))
    return out

  # ---- batch-major inputs and outputs -------------------------------------------------------
  def input_sharding(self, ndim: int, *, batch: int | None = None) -> NamedSharding:
    """Sharding of a [batch, ...] array of rank `ndim`; with `batch`, replicated if it does not divide."""
    if ndim < 1:
      return NamedSharding(self.mesh, P())
    shape = None if batch is None else (batch,) + (1,) * (ndim - 1)
    return NamedSharding(self.mesh, self.spec_for(("batch",) + (None,) * (ndim - 1), shape))

  def output_sharding(self, ndim: int, *, batch: int | None = None) -> NamedSharding:
    """Outputs are batch-major like inputs: same rule."""
    return self.input_sharding(ndim, batch=batch)

  # ---- replicas -----------------------------------------------------------------------------
  def placements(self) -> list[tuple[Mesh, ShardingPlan]]:
    """Per-replica (mesh, plan): one 1-device pair per device for `replicated`, else [(mesh, self)].

    The scheduler feeds replicas in turn; each replica compiles and holds its own params.
    """
    if self.strategy != "replicated":
      return [(self.mesh, self)]
    out = []
    for device in self.mesh.devices.reshape(-1):
      mesh = single_device_mesh(device)
      out.append((mesh, ShardingPlan(self.strategy, mesh)))
    return out

  # ---- table-wise ---------------------------------------------------------------------------
  def table_placement(
      self, logical_axes_list: Sequence[LogicalAxes], shapes: Sequence[Sequence[int]]
  ) -> TablePlacement | None:
    """For `embedding_tables`: which device holds each ("table_rows", "embed") leaf; else None.

    Deterministic in (axes, shapes, device count), so `param_shardings` and the engine agree.
    Other ("table_rows", ...) leaves are per-row side arrays of 8-bit tables (scale, offset):
    each goes with the nearest table leaf before it that has its row count (the order in
    which models.embedding.QuantizedTable flattens: codes, offset, scale).
    """
    if self.strategy != "embedding_tables":
      return None
    leaves = [i for i, a in enumerate(logical_axes_list)
              if a is not None and len(a) == 2 and a[0] == "table_rows"]
    if not leaves:
      return None
    side: dict[int, list[int]] = {i: [] for i in leaves}
    for i, a in enumerate(logical_axes_list):
      if a is None or a[:1] != ("table_rows",) or len(a) == 2:
        continue
      owner = [t for t in leaves if t < i and shapes[t][0] == shapes[i][0]]
      if not owner:
        raise ValueError(f"embedding_tables: leaf {i} {tuple(shapes[i])} with axes {a} follows"
                         " no table of its row count, so it cannot go with one: use"
                         " embedding_rows")
      side[owner[-1]].append(i)
    placement = TablePlacement.balance(leaves, [tuple(shapes[i]) for i in leaves],
                                       self.num_devices)
    if any(side.values()):
      placement = dataclasses.replace(placement, side=tuple(tuple(side[i]) for i in leaves))
    return placement


# ---- checkpoints ------------------------------------------------------------------------------
def abstract_params(
    shapes: Sequence[Sequence[int]], dtypes: Sequence[Any], shardings: Sequence[jax.sharding.Sharding]
) -> list[jax.ShapeDtypeStruct]:
  """Restore targets: one `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` per leaf."""
  if not len(shapes) == len(dtypes) == len(shardings):
    raise ValueError(f"{len(shapes)} shapes, {len(dtypes)} dtypes, {len(shardings)} shardings")
  return [jax.ShapeDtypeStruct(tuple(s), jnp.dtype(d), sharding=sh)
          for s, d, sh in zip(shapes, dtypes, shardings)]


def restore_sharded(directory: str | os.PathLike[str], target: Any) -> Any:
  """Restores an orbax StandardCheckpointer checkpoint straight into `target`'s shardings.

  `target` is the saved tree with `jax.ShapeDtypeStruct(..., sharding=...)` leaves (e.g. from
  `abstract_params`): each device reads only its own shards, no full copy lands on one device.
  """
  import orbax.checkpoint as ocp  # heavy; imported on use

  path = os.path.abspath(os.fspath(directory))
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def place_from_host(
    leaves: Sequence[np.ndarray | jax.Array], shardings: Sequence[jax.sharding.Sharding]
) -> list[jax.Array]:
  """Places host arrays: each device receives only its slice (works across processes)."""
  out = []
  for x, sh in zip(leaves, shardings, strict=True):
    host = np.asarray(x)
    out.append(jax.make_array_from_callback(host.shape, sh, lambda idx, h=host: h[idx]))
  return out


def jit_step(
    fn: Callable[..., Any], plan: ShardingPlan, param_shardings: Sequence[NamedSharding],
    input_ndims: Sequence[int], output_ndim: int, batch: int,
) -> Callable[..., Any]:
  """`jax.jit(fn)` for `fn(params_list, *inputs) -> output` with the plan's shardings bound."""
  return jax.jit(
      fn,
      in_shardings=(list(param_shardings),
                    *(plan.input_sharding(n, batch=batch) for n in input_ndims)),
      out_shardings=plan.output_sharding(output_ndim, batch=batch),
  )


def serving_params(
    plan: ShardingPlan, leaves: Sequence[jax.Array | np.ndarray],
    logical_axes_list: Sequence[LogicalAxes], shapes: Sequence[Sequence[int]],
) -> tuple[list[jax.Array], list[NamedSharding], TablePlacement | None]:
  """Leaves (host, or restored to `param_shardings`) -> (params, their jit in_shardings, tables).

  Without table-wise placement the params are the leaves, placed. Under `embedding_tables` the
  table leaves are removed and their fusion appended last; the model must then look embeddings
  up with `tables.lookup(params[-1], ids, plan.mesh)` instead of indexing the tables. 8-bit
  tables' side arrays (`tables.side`) are removed too, and fused after the codes, in the order
  `side` lists them (params[-1 - len(side[0]):] = codes, side arrays).
  """
  placement = plan.table_placement(logical_axes_list, shapes)
  homes = plan.param_shardings(logical_axes_list, shapes)
  table_set = set(placement.leaf_index) if placement else set()
  if placement is not None and placement.side:
    table_set |= {i for s in placement.side for i in s}
  params, shardings = [], []
  for i, (x, sh) in enumerate(zip(leaves, homes, strict=True)):
    if i in table_set:
      continue
    params.append(x if getattr(x, "sharding", None) == sh else jax.device_put(x, sh))
    shardings.append(sh)
  if placement is not None:
    groups = [placement.leaf_index]
    if placement.side:
      groups += [tuple(s[j] for s in placement.side) for j in range(len(placement.side[0]))]
    for group in groups:
      fused = placement.fuse([jax.device_put(leaves[i], homes[i]) for i in group], plan.mesh)
      params.append(fused)
      shardings.append(fused.sharding)
  return params, shardings, placement
