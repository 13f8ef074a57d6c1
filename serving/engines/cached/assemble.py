"""The device half of a cached lookup (traced into each batch's executable, see engine.py):
it assembles the batch's [B, F, D] embeddings from tables on the device, device caches and the
batch's miss rows, and writes the admitted misses into the caches (donated, so in place).

Miss buffers have a fixed set of sizes (`miss_buckets`), so every shape is compiled at load.
Admitted misses are written first and hits read after, from the written cache: the slots a
batch writes are free or evicted ones, never one it reads (row_cache protects its hits), so the
values read are the same and XLA updates the donated cache in place instead of copying it.
Every feature's vectors come out of the same expression (gather, dequantize for 8-bit tables
as codes * scale + offset, zero for a missing id) whether its rows came from a table, a cache
or the miss buffer: the result is bit-identical to every table on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

FIRST_MISS_BUCKET = 64
MISS_BUCKET_STEP = 4  # miss buffers of 64, 256, 1024, ... rows


def miss_buckets(batch: int, cached_features: int) -> tuple[int, ...]:
  """The miss-buffer sizes a batch of `batch` rows may need (all its lookups may miss)."""
  if not cached_features:
    return (0,)
  need, out, m = batch * cached_features, [], FIRST_MISS_BUCKET
  while True:
    out.append(m)
    if m >= need:
      return tuple(out)
    m *= MISS_BUCKET_STEP


def miss_bucket(misses: int, buckets: Sequence[int]) -> int:
  """The smallest miss buffer that holds `misses` rows."""
  for m in buckets:
    if m >= misses:
      return m
  raise ValueError(f"{misses} misses exceed the largest miss buffer {buckets[-1]}")


def make_assemble(cached: Sequence[bool], cache_rows: Sequence[int | None],
                  quantized: bool) -> Callable[..., Any]:
  """fn(tables, caches, rows, miss, insert_slot, insert_from) -> (embeddings, caches).

  tables: per on-device feature, (codes[, scale, offset]); caches: per cached feature, the
  same with capacity + 1 rows (the last a scratch row padded writes land in); rows: int32 [B, F]
  (on-device feature: the table row; cached feature: slot < capacity, or capacity + position
  in the miss buffer; -1: missing id); miss: (codes [M, D][, scale [M], offset [M]]);
  insert_slot, insert_from: int32 [Fc, M], miss row insert_from[k, j] goes to slot
  insert_slot[k, j] of cached feature k (padding: the scratch slot).
  """
  import jax.numpy as jnp

  def vectors(codes: Any, side: tuple[Any, ...], valid: Any) -> Any:
    v = codes.astype(jnp.float32)
    if quantized:
      v = v * side[0][:, None] + side[1][:, None]
    return jnp.where(valid[:, None], v, jnp.zeros((), jnp.float32))

  def fn(tables, caches, rows, miss, insert_slot, insert_from):
    out, new_caches = [], []
    ti = ci = 0
    for f, is_cached in enumerate(cached):
      r = rows[:, f]
      valid = r >= 0
      if not is_cached:
        idx = jnp.maximum(r, 0)
        parts = [jnp.take(a, idx, axis=0) for a in tables[ti]]
        ti += 1
      else:
        cap = cache_rows[f]
        hit = r < cap
        from_cache = jnp.clip(r, 0, cap)
        from_miss = jnp.clip(r - cap, 0, miss[0].shape[0] - 1)
        slot, src = insert_slot[ci], insert_from[ci]
        written = tuple(a.at[slot].set(jnp.take(m, src, axis=0)) for a, m in zip(caches[ci], miss))
        parts = [jnp.where(hit.reshape(-1, *([1] * (a.ndim - 1))), jnp.take(a, from_cache, axis=0),
                           jnp.take(m, from_miss, axis=0))
                 for a, m in zip(written, miss)]
        new_caches.append(written)
        ci += 1
      out.append(vectors(parts[0], tuple(parts[1:]), valid))
    return jnp.stack(out, axis=1), new_caches

  return fn


def gather_misses(host: Sequence[Sequence[np.ndarray]], parts: Sequence[tuple[int, np.ndarray]],
                  size: int) -> list[np.ndarray]:
  """The miss buffer: rows `rows` of host table `k` for each (k, rows) in order, padded to
  `size` rows; one array per table part (codes[, scale, offset]). np.take releases the GIL."""
  out = [np.zeros((size, *a.shape[1:]), a.dtype) for a in host[0]] if host else []
  at = 0
  for k, rows in parts:
    n = len(rows)
    for buf, a in zip(out, host[k]):
      np.take(a, rows, axis=0, out=buf[at:at + n], mode="clip")
    at += n
  return out
