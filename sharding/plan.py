"""ShardingPlan: a strategy's rules bound to a mesh, applied to concrete parameter shapes.

The serving engine has, per flat parameter leaf, its logical axes (or None) and shape; the plan
turns them into NamedShardings (restore targets and jit in_shardings) and gives the shardings of
batch-major inputs and outputs. Table-wise embedding sharding (`embedding_tables`) of separate
per-feature tables goes through `TablePlacement`, which fuses them into one row-sharded array
whose per-device blocks hold whole tables.
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


@dataclasses.dataclass(frozen=True, slots=True)
class TablePlacement:
  """Table-wise sharding: whole tables on single devices, balanced by bytes (greedy, largest first).

  Separate [rows_f, D] tables are fused into one [num_shards * block_rows, D] array whose rows
  are split evenly over every device of the mesh (in mesh order), so block k, on device k, holds
  exactly the tables with `shard[f] == k` (at rows `offset[f]`..) plus zero padding. That one
  array has an ordinary NamedSharding on the serving mesh, so it is a plain jit argument;
  `lookup` gathers each feature on its owner device and all-gathers the [B, F_k, D] results.
  """

  leaf_index: tuple[int, ...]  # flat-leaf index of each table, in feature order
  rows: tuple[int, ...]
  shard: tuple[int, ...]  # block (= device position in the mesh) holding table f
  offset: tuple[int, ...]  # first row of table f in its block
  block_rows: int
  dim: int
  num_shards: int
  side: tuple[tuple[int, ...], ...] = ()  # per table, flat-leaf indices of its per-row arrays

  def __post_init__(self):
    n = len(self.leaf_index)
    if not (len(self.rows) == len(self.shard) == len(self.offset) == n):
      raise ValueError("leaf_index, rows, shard and offset must have one entry per table")
    for f in range(n):
      if not 0 <= self.shard[f] < self.num_shards:
        raise ValueError(f"table {f}: shard {self.shard[f]} outside 0..{self.num_shards - 1}")
      if self.offset[f] + self.rows[f] > self.block_rows:
        raise ValueError(f"table {f} overflows its block ({self.block_rows} rows)")
    if self.side and len(self.side) != n:
      raise ValueError(f"side needs one entry per table ({n}), got {len(self.side)}")

  @classmethod
  def balance(
      cls, leaf_index: Sequence[int], shapes: Sequence[tuple[int, int]], num_shards: int
  ) -> TablePlacement:
    """Greedy longest-processing-time: biggest table first, onto the least-loaded device that
    holds fewer than ceil(F / devices) tables.

    Tables share one dim and dtype (`fuse` checks), so bytes are proportional to rows. The cap
    matters because `lookup` all-gathers [B, F_k, D] padded to the largest F_k: without it,
    the devices of many small tables set F_k (7 of 26 features on one of 8 devices in the demo,
    2.2x the bytes needed).
    """
    dims = {s[1] for s in shapes}
    if len(dims) != 1:
      raise ValueError(f"table-wise fusion needs one embedding dim, got {sorted(dims)}")
    sizes = [s[0] for s in shapes]
    load = [0] * num_shards
    used_rows = [0] * num_shards
    shard = [0] * len(shapes)
    offset = [0] * len(shapes)
    count, cap = [0] * num_shards, -(-len(shapes) // num_shards)
    for f in sorted(range(len(shapes)), key=lambda f: (-sizes[f], f)):
      k = min((k for k in range(num_shards) if count[k] < cap), key=lambda k: (load[k], k))
      count[k] += 1
      shard[f], offset[f] = k, used_rows[k]
      load[k] += sizes[f]
      used_rows[k] += shapes[f][0]
    return cls(tuple(leaf_index), tuple(s[0] for s in shapes), tuple(shard), tuple(offset),
               max(1, max(used_rows)), dims.pop(), num_shards)

  @property
  def fused_shape(self) -> tuple[int, int]:
    return (self.num_shards * self.block_rows, self.dim)

  def shard_rows(self) -> list[int]:
    """Real (unpadded) table rows on each device."""
    out = [0] * self.num_shards
    for f, k in enumerate(self.shard):
      out[k] += self.rows[f]
    return out

  def fused_sharding(self, mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over all mesh axes: block k on `mesh.devices.flat[k]`."""
    if mesh.devices.size != self.num_shards:
      raise ValueError(f"placement is for {self.num_shards} devices, mesh has {mesh.devices.size}")
    return NamedSharding(mesh, P(MESH_AXES, *(None,) * (ndim - 1)))

  def fuse(self, tables: Sequence[jax.Array | np.ndarray | None], mesh: Mesh) -> jax.Array:
    """Builds the fused array from the tables (feature order), block by block on its own device.

    No device ever holds more than its block: each block is concatenated on its owner (tables
    restored to `param_shardings` homes are already there). Tables for blocks this process does
    not address may be None. Per-row side arrays ([rows_f] scales or offsets of 8-bit tables)
    fuse the same way, into [num_shards * block_rows] with the tables' row layout.
    """
    if len(tables) != len(self.rows):
      raise ValueError(f"{len(tables)} tables for a placement of {len(self.rows)}")
    present = [t for t in tables if t is not None]
    trail = tuple(present[0].shape[1:]) if present else (self.dim,)
    if trail not in ((self.dim,), ()):
      raise ValueError(f"tables must be [rows, {self.dim}] (or [rows] side arrays), got"
                       f" [rows, {trail}]")
    sharding = self.fused_sharding(mesh, 1 + len(trail))
    devices = mesh.devices.reshape(-1)
    dtypes = {jnp.dtype(t.dtype) for t in present}
    if len(dtypes) != 1:
      raise ValueError(f"table-wise fusion needs one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    blocks = []
    for k, device in enumerate(devices):
      if device.process_index != jax.process_index():
        continue
      parts = []
      for f in sorted((f for f in range(len(self.rows)) if self.shard[f] == k),
                      key=lambda f: self.offset[f]):
        t = tables[f]
        if t is None or tuple(t.shape) != (self.rows[f], *trail):
          raise ValueError(f"table {f} must be a {[self.rows[f], *trail]} array, got"
                           f" {None if t is None else t.shape}")
        parts.append(jax.device_put(t, device))
      pad = self.block_rows - sum(p.shape[0] for p in parts)
      if pad:
        parts.append(jax.device_put(np.zeros((pad, *trail), dtype), device))
      block = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
      blocks.append(block)
    return jax.make_array_from_single_device_arrays(
        (self.num_shards * self.block_rows, *trail), sharding, blocks)

  def lookup(self, fused: jax.Array, ids: jax.Array, mesh: Mesh, *,
             scale: jax.Array | None = None, offset: jax.Array | None = None) -> jax.Array:
    """[B, F] ids (modulo rows; negative = missing -> zeros) -> [B, F, D] float32; under jit.

    Each device gathers only its own tables' features ([B, F_max, D], masked), then one
    all-gather of those activations assembles [B, F, D] on every device; no weight moves.
    8-bit tables: `fused` holds the codes and `scale`, `offset` the fused per-row arrays;
    each device dequantizes its rows (codes * scale + offset) before the all-gather.
    """
    if (scale is None) != (offset is None):
      raise ValueError("give both scale and offset (8-bit tables) or neither")
    per_shard = [sorted((f for f in range(len(self.rows)) if self.shard[f] == k)) for k in
                 range(self.num_shards)]
    width = max(1, max(len(fs) for fs in per_shard))
    feat = np.full((self.num_shards, width), -1, np.int32)
    off = np.zeros((self.num_shards, width), np.int32)
    nrows = np.ones((self.num_shards, width), np.int32)
    slot = [0] * len(self.rows)
    for k, fs in enumerate(per_shard):
      for j, f in enumerate(fs):
        feat[k, j], off[k, j], nrows[k, j], slot[f] = f, self.offset[f], self.rows[f], j

    def local(block: jax.Array, ids: jax.Array, *side: jax.Array) -> jax.Array:
      # block: [block_rows, D] (this device's tables); ids: [B, F] (replicated);
      # side: () or this device's [block_rows] scale and offset
      k = jax.lax.axis_index(MESH_AXES)
      my_feat, my_off, my_rows = jnp.asarray(feat)[k], jnp.asarray(off)[k], jnp.asarray(nrows)[k]
      col = jnp.take(ids, jnp.maximum(my_feat, 0), axis=1).astype(jnp.int32)  # [B, W]
      valid = (col >= 0) & (my_feat >= 0)[None, :]
      row = my_off[None, :] + jnp.where(valid, col % my_rows[None, :], 0)
      vec = jnp.take(block, row, axis=0)  # [B, W, D]
      if side:
        s, o = (jnp.take(a, row, axis=0)[..., None] for a in side)  # [B, W, 1]
        vec = vec.astype(jnp.float32) * s + o
      vec = jnp.where(valid[..., None], vec, jnp.zeros((), vec.dtype))
      return jax.lax.all_gather(vec, MESH_AXES, axis=0)  # [num_shards, B, W, D]

    side = () if scale is None else (scale, offset)
    # all_gather makes every device hold the same value, which the vma check cannot see through
    # (the gathered values are device-dependent), hence check_vma=False.
    gathered = jax.shard_map(
        local, mesh=mesh, in_specs=(P(MESH_AXES, None), P(), *(P(MESH_AXES),) * len(side)),
        out_specs=P(), check_vma=False)(fused, ids, *side)
    out = gathered[np.asarray(self.shard), :, np.asarray(slot)]  # [F, B, D]
    return jnp.transpose(out, (1, 0, 2)).astype(jnp.float32)


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
