"""Helpers for model tests: run the Flax original (the reference served outputs must equal), random
token batches, logical-axis checks. Serving and calling: tests/clientutil.py."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from sharding.rules import LOGICAL_AXES


def reference(model: nnx.Module, method: str = "__call__") -> Callable[..., dict[str, np.ndarray]]:
  """The Flax model itself (outside any bundle or server), jitted so each shape compiles once."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state: Any, kwargs: dict[str, Any]) -> Any:
    return getattr(nnx.merge(graphdef, state), method)(**kwargs)

  return lambda **kw: {k: np.asarray(v) for k, v in run(state, kw).items()}


def tokens(rng: np.random.Generator, rows: int, length: int, vocab: int,
           min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded token ids [rows, length] (padding is junk, not zeros) and lengths [rows]."""
  ids = rng.integers(0, vocab, size=(rows, length)).astype(np.int32)
  lengths = rng.integers(min(min_len, length), length + 1, size=rows).astype(np.int32)
  return ids, lengths


def check_logical_axes(model: nnx.Module) -> None:
  """Every parameter names a known logical axis (or None) per dimension."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(var.shape), (path, axes)
    assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
