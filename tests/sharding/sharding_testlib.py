"""Shared helpers for the sharding tests: flat DLRM params, batches, and a step per strategy."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.dlrm import DLRM, DLRMConfig
from sharding import ShardingPlan, TablePlacement, jit_step, serving_params

# Row counts divide 2, 4 and 8 devices (and dims divide the `model` axis) so nothing falls back.
DIVISIBLE = dataclasses.replace(
    DLRMConfig.tiny(), table_sizes=(1024, 512, 256, 128) + (64,) * 22)
# Four tables: the multi-process test compiles in several processes on 2 shared cores.
FEW_TABLES = dataclasses.replace(DIVISIBLE, table_sizes=(1024, 512, 256, 128))


@dataclasses.dataclass(frozen=True)
class FlatModel:
  """A model split into a graph, a flat list of param leaves and their manifest entries."""

  graphdef: Any
  treedef: Any
  leaves: list[jax.Array]
  axes: list[tuple[str, ...] | None]
  shapes: list[tuple[int, ...]]
  dtypes: list[Any]

  def module(self, leaves: list[Any]) -> nnx.Module:
    return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves))


def flatten(model: nnx.Module) -> FlatModel:
  """Flat leaves with their `logical_axes` metadata, in jax.tree order (as the exporter does)."""
  graphdef, state = nnx.split(model)
  variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  leaves, treedef = jax.tree.flatten(state)
  assert len(variables) == len(leaves)
  axes = [v.get_metadata().get("logical_axes") for v in variables]
  return FlatModel(graphdef, treedef, leaves, axes, [tuple(x.shape) for x in leaves],
                   [x.dtype for x in leaves])


def dlrm(config: DLRMConfig, seed: int = 0, *, abstract: bool = False) -> FlatModel:
  """The DLRM's flat params; `abstract` gives ShapeDtypeStruct leaves without initialising."""
  if abstract:
    return flatten(nnx.eval_shape(lambda: DLRM(config, rngs=nnx.Rngs(seed))))
  return flatten(DLRM(config, rngs=nnx.Rngs(seed)))


def batch(config: DLRMConfig, size: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Dense floats and sparse ids: large ids (hashed modulo rows) and some -1 (missing)."""
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(size, config.num_dense)).astype(np.float32)
  sparse = rng.integers(0, 5000, size=(size, config.num_sparse)).astype(np.int32)
  sparse[rng.random(sparse.shape) < 0.1] = -1
  return dense, sparse


def step_fn(flat: FlatModel, placement: TablePlacement | None, plan: ShardingPlan
            ) -> Callable[..., jax.Array]:
  """`fn(params, dense, sparse) -> prob` for `serving_params`' layout.

  Table-wise: embeddings come from `placement.lookup`; the model then runs unchanged with each
  table replaced by its looked-up [B, D] rows and ids 0..B-1 (lookup of row b is row b).
  """
  if placement is None:
    return lambda params, dense, sparse: flat.module(params)(dense, sparse)["prob"]
  tables = set(placement.leaf_index)

  def fn(params, dense, sparse):
    emb = placement.lookup(params[-1], sparse, plan.mesh)  # [B, F, D]
    dense_params = iter(params[:-1])
    by_table = dict(zip(placement.leaf_index, range(len(placement.leaf_index))))
    leaves = [emb[:, by_table[i]] if i in tables else next(dense_params)
              for i in range(len(flat.leaves))]
    ids = jnp.broadcast_to(jnp.arange(dense.shape[0], dtype=jnp.int32)[:, None], sparse.shape)
    return flat.module(leaves)(dense, ids)["prob"]

  return fn


def compile_step(flat: FlatModel, plan: ShardingPlan, config: DLRMConfig, size: int):
  """(compiled, params, placement) for `plan`; the compiled step takes (params, dense, sparse)."""
  params, shardings, placement = serving_params(plan, flat.leaves, flat.axes, flat.shapes)
  jitted = jit_step(step_fn(flat, placement, plan), plan, shardings, (2, 2), 2, size)
  compiled = jitted.lower(params, jax.ShapeDtypeStruct((size, config.num_dense), jnp.float32),
                          jax.ShapeDtypeStruct((size, config.num_sparse), jnp.int32)).compile()
  return compiled, params, placement
