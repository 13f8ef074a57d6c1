"""Mesh factory, PartitionSpec resolution, fallbacks, table placement and sharded restore."""

from __future__ import annotations

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sharding_testlib as tl
from sharding import (
    ShardingPlan, TablePlacement, abstract_params, make_mesh, mesh_shape, per_device_bytes,
    restore_sharded, serving_params,
)


@pytest.mark.parametrize("strategy,n,shape", [
    ("replicated", 4, (4, 1)), ("tensor", 4, (1, 4)), ("tensor+data", 8, (2, 4)),
    ("tensor+data", 4, (2, 2)), ("tensor+data", 2, (1, 2)), ("embedding_rows", 8, (1, 8)),
    ("embedding_tables", 2, (1, 2)),
])
def test_mesh_shapes_and_auto_axes(strategy, n, shape):
  assert mesh_shape(strategy, n) == shape
  mesh = make_mesh(strategy, n)
  assert mesh.axis_names == ("data", "model")
  assert tuple(mesh.shape.values()) == shape
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  assert set(mesh.devices.flat) == set(jax.devices()[:n])


def test_mesh_rejects_bad_requests():
  with pytest.raises(ValueError, match="only 8 are visible"):
    make_mesh("tensor", 16)
  with pytest.raises(ValueError, match="does not divide"):
    mesh_shape("tensor+data", 8, data=3)
  with pytest.raises(ValueError, match="only applies to tensor"):
    mesh_shape("tensor", 8, data=2)
  assert mesh_shape("tensor+data", 8, data=4) == (4, 2)


def test_megatron_pairs_and_batch_rules():
  plan = ShardingPlan.create("tensor+data", 8)  # data=2, model=4
  assert plan.spec_for(("embed", "mlp"), (16, 32)) == P(None, "model")  # column parallel
  assert plan.spec_for(("mlp", "embed"), (32, 16)) == P("model", None)  # row parallel
  assert plan.spec_for(("mlp",), (32,)) == P("model")
  assert plan.spec_for(("batch", "seq", "heads", "head_dim"), (4, 7, 8, 64)) == P(
      "data", None, "model", None)
  assert plan.spec_for(("table_rows", "embed"), (1024, 8)) == P(None, None)
  assert plan.spec_for(None, (3, 3)) == P()
  assert plan.input_sharding(2, batch=6).spec == P("data", None)
  assert plan.input_sharding(3, batch=1).spec == P(None, None, None)  # 1 row: replicated
  assert plan.output_sharding(2).spec == P("data", None)
  rows = ShardingPlan.create("embedding_rows", 4)
  assert rows.spec_for(("table_rows", "embed"), (1024, 8)) == P(("data", "model"), None)
  assert rows.spec_for(("embed", "mlp"), (16, 32)) == P(None, None)
  assert rows.input_sharding(2, batch=8).spec == P(None, None)


def test_fallbacks_are_logged_not_silent(caplog):
  plan = ShardingPlan.create("tensor", 8)
  with caplog.at_level(logging.INFO, logger="sharding.plan"):
    assert plan.spec_for(("embed", "mlp"), (16, 1)) == P(None, None)
    assert plan.spec_for(("mlp", "vocab"), (32, 64)) == P("model", None)  # model used once
  assert "does not divide" in caplog.text and "already used" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="sharding.plan"):
    out = plan.param_shardings([("embed", "mlp"), ("mlp",)], [(16, 12), (12,)])
  assert [s.spec for s in out] == [P(None, None), P(None)]
  assert "2 dimension(s) replicated" in caplog.text
  with pytest.raises(ValueError, match="has no rule"):
    plan.spec_for(("embed", "experts"), (4, 4))
  with pytest.raises(ValueError, match="differ in rank"):
    plan.spec_for(("embed",), (4, 4))


def test_replicated_yields_one_single_device_plan_per_device():
  plan = ShardingPlan.create("replicated", 4)
  placements = plan.placements()
  assert [m.devices.size for m, _ in placements] == [1] * 4
  assert [m.devices.flat[0] for m, _ in placements] == jax.devices()[:4]
  for mesh, p in placements:
    assert p.mesh is mesh and p.strategy == "replicated"
  assert ShardingPlan.create("tensor", 4).placements()[0][1].mesh.devices.size == 4


def test_table_placement_balances_by_bytes():
  # Hand-worked LPT: 100 -> d0, 60 -> d1, 50 -> d1 (60 < 100), 40 -> d0 (100 < 110),
  # 10 -> d1 (110 < 140).
  p = TablePlacement.balance([3, 4, 5, 6, 7], [(60, 8), (100, 8), (10, 8), (50, 8), (40, 8)], 2)
  assert p.shard == (1, 0, 1, 1, 0)
  assert p.shard_rows() == [140, 120]
  assert p.block_rows == 140 and p.fused_shape == (280, 8)
  assert p.offset == (0, 0, 110, 60, 100)
  # At most ceil(F / devices) tables a device (the all-gather is as wide as the fullest one):
  # 100 -> d0, 10 -> d1, 10 -> d1, and the last 10 to d0 because d1 holds its two already.
  q = TablePlacement.balance([0, 1, 2, 3], [(100, 8), (10, 8), (10, 8), (10, 8)], 2)
  assert q.shard == (0, 1, 1, 0) and q.shard_rows() == [110, 20] and q.block_rows == 110
  with pytest.raises(ValueError, match="one embedding dim"):
    TablePlacement.balance([0, 1], [(4, 8), (4, 16)], 2)
  plan = ShardingPlan.create("embedding_tables", 2)
  assert plan.table_placement([("embed", "mlp")], [(4, 4)]) is None
  # 8-bit tables: per-row scale/offset leaves follow their codes and share their home.
  axes = [("table_rows", "embed"), ("table_rows",), ("table_rows",), ("table_rows", "embed"),
          ("table_rows",), ("table_rows",)]
  shapes = [(6, 8), (6,), (6,), (4, 8), (4,), (4,)]
  q = plan.table_placement(axes, shapes)
  assert q.leaf_index == (0, 3) and q.side == ((1, 2), (4, 5)) and q.shard == (0, 1)
  homes = plan.param_shardings(axes, shapes)
  assert homes[0] == homes[1] == homes[2] != homes[3] == homes[4] == homes[5]
  with pytest.raises(ValueError, match="follows no table"):  # a side array needs its table
    plan.param_shardings([("table_rows",), ("table_rows", "embed")], [(4,), (4, 8)])


def _save(tmp_path, leaves):
  path = tmp_path / "params"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"leaves": {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}})
  return path


@pytest.mark.parametrize("strategy", ["embedding_rows", "embedding_tables"])
def test_restore_straight_into_sharded_layout(tmp_path, strategy):
  cfg = tl.DIVISIBLE
  flat = tl.dlrm(cfg)
  path = _save(tmp_path, flat.leaves)
  plan = ShardingPlan.create(strategy, 4)
  shardings = plan.param_shardings(flat.axes, flat.shapes)
  targets = abstract_params(flat.shapes, flat.dtypes, shardings)
  restored = restore_sharded(
      path, {"leaves": {f"{i:05d}": t for i, t in enumerate(targets)}})["leaves"]
  leaves = [restored[f"{i:05d}"] for i in range(len(targets))]
  for got, want, sh in zip(leaves, flat.leaves, shardings):
    assert got.sharding == sh
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  table_bytes = sum(r * cfg.embed_dim * 4 for r in cfg.table_sizes)
  dense_bytes = sum(x.nbytes for x, a in zip(flat.leaves, flat.axes) if a[0] != "table_rows")
  by_device = per_device_bytes(leaves)
  if strategy == "embedding_rows":
    assert sorted(by_device.values()) == [dense_bytes + table_bytes // 4] * 4
    return
  # Table-wise: each table restored onto its home device only, then fused there.
  placement = plan.table_placement(flat.axes, flat.shapes)
  rows = placement.shard_rows()
  for k, device in enumerate(plan.mesh.devices.flat):
    assert by_device[device] == dense_bytes + rows[k] * cfg.embed_dim * 4
  params, jit_shardings, placement2 = serving_params(plan, leaves, flat.axes, flat.shapes)
  assert placement2 == placement and len(params) == len(flat.leaves) - cfg.num_sparse + 1
  fused = params[-1]
  assert fused.sharding == jit_shardings[-1] == NamedSharding(plan.mesh, P(("data", "model"), None))
  for shard in fused.addressable_shards:
    k = list(plan.mesh.devices.flat).index(shard.device)
    assert shard.data.shape == (placement.block_rows, cfg.embed_dim)
    for f in range(cfg.num_sparse):
      if placement.shard[f] == k:
        o = placement.offset[f]
        np.testing.assert_array_equal(np.asarray(shard.data[o:o + placement.rows[f]]),
                                      np.asarray(flat.leaves[placement.leaf_index[f]]))
