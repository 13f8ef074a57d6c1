"""TablePlacement: table-wise embedding sharding, whole tables on single devices.

Separate per-feature [rows_f, D] tables are fused into one row-sharded array whose per-device
blocks hold whole tables; `ShardingPlan.table_placement` (sharding/plan.py) decides when.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.rules import MESH_AXES


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
