"""Batch-invariant scores: a row model run over its batch in fixed tiles, one after another.

XLA picks its matmul kernel (and so the order of a row's reductions) by the operands' shapes:
on CPU a row scored alone, in a batch of 2-32 and in one of 64+ comes out different in the last
bit. An auction must give an ad the same score whatever shared its batch, so the deterministic
export runs the model over `tile`-row slices of the (padded) batch with `lax.map`: every slice
has the same shape whatever the bucket, so every row goes through the same compiled kernel.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp


def run_rows(fn: Callable[[dict[str, Any]], dict[str, Any]], inputs: Mapping[str, Any], *,
             deterministic: bool, tile: int) -> dict[str, Any]:
  """`fn(inputs)`, in fixed tiles when the export is deterministic (ExportConfig)."""
  return tiled_rows(fn, inputs, tile) if deterministic else fn(dict(inputs))


def tiled_rows(fn: Callable[[dict[str, Any]], dict[str, Any]], inputs: Mapping[str, Any],
               tile: int) -> dict[str, Any]:
  """`fn` (rows in, rows out; rows independent) over `inputs`' leading dimension in slices of
  `tile` rows, the batch zero-padded to a multiple of `tile`; works with a symbolic batch."""
  b = next(iter(inputs.values())).shape[0]
  n = (b + tile - 1) // tile

  def slices(x: Any) -> Any:
    x = jnp.pad(x, [(0, n * tile - b)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((n, tile) + tuple(x.shape[1:]))

  out = jax.lax.map(fn, {k: slices(v) for k, v in inputs.items()})
  return {k: v.reshape((n * tile,) + tuple(v.shape[2:]))[:b] for k, v in out.items()}
