"""Partition rules as data: per strategy, logical axis name -> mesh axis (or axes, or None).

Models name logical axes only (`("embed", "mlp")`); a strategy's table binds them to the
`data` and `model` axes of the mesh `sharding.mesh.make_mesh` builds. A value may be one mesh
axis, a tuple of mesh axes (the dimension is split over their product), or None (replicated).
`sharding.plan.ShardingPlan` applies a table to concrete shapes (with the divisibility fallback).
"""

from __future__ import annotations

import types
from typing import Mapping, Union

DATA = "data"
MODEL = "model"
MESH_AXES: tuple[str, str] = (DATA, MODEL)

LOGICAL_AXES: tuple[str, ...] = (
    "batch", "seq", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "table_rows",
    "tables", "cross",
)

MeshAxes = Union[str, tuple[str, ...], None]


def _table(**overrides: MeshAxes) -> Mapping[str, MeshAxes]:
  unknown = set(overrides) - set(LOGICAL_AXES)
  if unknown:
    raise ValueError(f"rules name unknown logical axes {sorted(unknown)}")
  return types.MappingProxyType({name: overrides.get(name) for name in LOGICAL_AXES})


# Megatron: ("embed", "mlp") kernels split on output columns, ("mlp", "embed") kernels on input
# rows, so each pair needs one all-reduce; attention splits whole heads; vocab-parallel LM
# embeddings. Embedding tables (`table_rows`) stay whole: that is what the embedding_* strategies do.
_TENSOR = dict(mlp=MODEL, heads=MODEL, kv_heads=MODEL, vocab=MODEL)

STRATEGY_RULES: Mapping[str, Mapping[str, MeshAxes]] = types.MappingProxyType({
    # Whole model on every device; `ShardingPlan.placements()` gives one 1-device plan per replica.
    "replicated": _table(),
    # Dense layers tensor-parallel over `model`; batch replicated.
    "tensor": _table(**_TENSOR),
    # 2-D: batch over `data`, tensor parallel over `model`.
    "tensor+data": _table(batch=DATA, **_TENSOR),
    # Each table split by rows over every device (lookup = masked local gather + all-reduce);
    # dense part replicated.
    "embedding_rows": _table(table_rows=(DATA, MODEL), vocab=(DATA, MODEL)),
    # Whole tables on single devices, balanced by bytes (TorchRec table-wise). A stacked
    # [tables, rows, embed] parameter splits on `tables`; separate per-feature tables are fused
    # into per-device blocks by `sharding.tables.TablePlacement` (rules alone cannot say "this whole
    # array lives on device k" for a jit over one mesh).
    "embedding_tables": _table(tables=(DATA, MODEL)),
})

STRATEGIES: tuple[str, ...] = tuple(STRATEGY_RULES)


def rules_for(strategy: str) -> Mapping[str, MeshAxes]:
  """The logical-axis table of `strategy`; raises ValueError naming the known strategies."""
  try:
    return STRATEGY_RULES[strategy]
  except KeyError:
    raise ValueError(f"unknown sharding strategy {strategy!r}; known: {STRATEGIES}") from None


def mesh_axes_of(value: MeshAxes) -> tuple[str, ...]:
  """A rule value as a tuple of mesh axis names (empty for None)."""
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)
