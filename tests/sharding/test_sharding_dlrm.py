"""DLRM under every strategy on 2, 4 and 8 devices: same outputs as one device, the collectives
the plan implies, and the per-device parameter bytes it promises."""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
import pytest

import sharding_testlib as tl
from models.dlrm import DLRMConfig
from sharding import STRATEGIES, ShardingPlan, collective_stats, collectives, per_device_bytes

BATCH = 8
CASES = [(s, n) for s in STRATEGIES for n in (2, 4, 8)]
IDS = [f"{s}-{n}" for s, n in CASES]


class _Run:
  """One compiled strategy: plan, placed params, compiled step and its outputs."""

  def __init__(self, flat, cfg, strategy, n, dense, sparse):
    self.plan = ShardingPlan.create(strategy, n)
    self.replicas = self.plan.placements()
    _, plan = self.replicas[0]
    self.compiled, self.params, self.tables = tl.compile_step(flat, plan, cfg, BATCH)
    self.out = np.asarray(self.compiled(self.params, dense, sparse))
    self.hlo = self.compiled.as_text()
    self.run_plan = plan


@pytest.fixture(scope="module")
def setup():
  cfg = tl.DIVISIBLE
  flat = tl.dlrm(cfg)
  dense, sparse = tl.batch(cfg, BATCH)
  ref = np.asarray(jax.jit(tl.step_fn(flat, None, None))(flat.leaves, dense, sparse))
  runs: dict[tuple[str, int], _Run] = {}

  def get(strategy: str, n: int) -> _Run:
    if (strategy, n) not in runs:
      runs[(strategy, n)] = _Run(flat, cfg, strategy, n, dense, sparse)
    return runs[(strategy, n)]

  return cfg, flat, ref, get


@pytest.mark.parametrize("strategy,n", CASES, ids=IDS)
def test_outputs_match_single_device(setup, strategy, n):
  _, _, ref, get = setup
  run = get(strategy, n)
  assert run.out.shape == (BATCH, 1)
  np.testing.assert_allclose(run.out, ref, rtol=1e-6, atol=1e-7)


def _row_parallel_outputs(flat, plan) -> list[int]:
  """Output widths of the kernels the plan splits by input rows (each ends a Megatron pair)."""
  specs = [plan.spec_for(a, s) for a, s in zip(flat.axes, flat.shapes)]
  return [s[1] for a, s, spec in zip(flat.axes, flat.shapes, specs)
          if a == ("mlp", "embed") and spec[0] is not None]


@pytest.mark.parametrize("strategy,n", CASES, ids=IDS)
def test_hlo_has_the_collectives_the_plan_implies(setup, strategy, n):
  cfg, flat, _, get = setup
  run = get(strategy, n)
  stats = collective_stats(run.hlo)
  # Never a whole weight gathered onto a device.
  weight_shapes = {s for s, a in zip(flat.shapes, flat.axes)}
  for c in collectives(run.hlo):
    if c.op == "all-gather":
      assert not {dims for _, dims in c.shapes} & weight_shapes, c
  d = cfg.embed_dim
  if strategy == "replicated":
    assert stats.total_count == 0
  elif strategy in ("tensor", "tensor+data"):
    outs = _row_parallel_outputs(flat, run.run_plan)
    assert len(outs) == 2  # bottom (32->8) and top (32->16) pairs; 16->1 falls back
    local_batch = BATCH // run.run_plan.mesh.shape["data"]
    assert stats.count["all-reduce"] == len(outs)
    assert stats.nbytes["all-reduce"] == sum(local_batch * o * 4 for o in outs)
    assert stats.total_count == stats.count["all-reduce"]
  elif strategy == "embedding_rows":
    # Masked local gather per table, partial rows summed: BATCH x D floats per table.
    assert stats.count["all-reduce"] >= 1 and stats.count["all-gather"] == 0
    assert stats.nbytes["all-reduce"] == cfg.num_sparse * BATCH * d * 4
  elif strategy == "embedding_tables":
    # Each device looks up its own tables; one all-gather of activations assembles [B, F, D].
    width = max(run.tables.shard.count(k) for k in range(n))
    assert stats.count["all-gather"] == 1 and stats.count["all-reduce"] == 0
    assert stats.nbytes["all-gather"] == n * BATCH * width * d * 4


@pytest.mark.parametrize("strategy,n", CASES, ids=IDS)
def test_per_device_param_bytes(setup, strategy, n):
  cfg, flat, _, get = setup
  run = get(strategy, n)
  by_device = per_device_bytes(run.params)
  table_bytes = sum(r * cfg.embed_dim * 4 for r in cfg.table_sizes)
  total = sum(x.nbytes for x in flat.leaves)
  dense = total - table_bytes
  if strategy == "replicated":
    assert len(run.replicas) == n
    assert list(by_device.values()) == [total]  # one replica = one device holding everything
    return
  assert len(by_device) == n
  if strategy == "embedding_rows":
    assert set(by_device.values()) == {dense + table_bytes // n}
  elif strategy == "embedding_tables":
    rows = run.tables.shard_rows()
    assert sum(rows) == sum(cfg.table_sizes)
    # Greedy bound: no device above the average plus the largest table.
    assert max(rows) <= sum(cfg.table_sizes) / n + max(cfg.table_sizes)
    assert set(by_device.values()) == {dense + run.tables.block_rows * cfg.embed_dim * 4}
  else:  # tensor-parallel dense; tables replicated
    expected = 0
    for x, a, s in zip(flat.leaves, flat.axes, flat.shapes):
      spec = run.run_plan.spec_for(a, s)
      split = math.prod(run.run_plan.mesh.shape[ax] for p in spec if p
                        for ax in ((p,) if isinstance(p, str) else p))
      expected += x.nbytes // split
    assert set(by_device.values()) == {expected}
    assert expected < total


@pytest.mark.parametrize("strategy", ["embedding_rows", "tensor"])
def test_indivisible_dims_fall_back_to_replicated(strategy, caplog):
  """DLRMConfig.tiny on 8 devices: tables of 500, 97, 50 and 10 rows do not divide 8."""
  cfg = DLRMConfig.tiny()
  flat = tl.dlrm(cfg)
  dense, sparse = tl.batch(cfg, BATCH)
  ref = np.asarray(jax.jit(tl.step_fn(flat, None, None))(flat.leaves, dense, sparse))
  plan = ShardingPlan.create(strategy, 8)
  with caplog.at_level(logging.WARNING, logger="sharding.plan"):
    compiled, params, _ = tl.compile_step(flat, plan, cfg, BATCH)
  assert "replicated because they do not divide" in caplog.text
  np.testing.assert_allclose(np.asarray(compiled(params, dense, sparse)), ref, rtol=1e-6,
                             atol=1e-7)
  by_device = per_device_bytes(params)
  if strategy == "embedding_rows":
    # Only the 1000-row table is split; the rest are whole on every device.
    table_bytes = sum(r * cfg.embed_dim * 4 for r in cfg.table_sizes)
    dense_bytes = sum(x.nbytes for x in flat.leaves) - table_bytes
    t00 = 1000 * cfg.embed_dim * 4
    assert set(by_device.values()) == {dense_bytes + table_bytes - t00 + t00 // 8}
    assert collective_stats(compiled.as_text()).nbytes["all-reduce"] == BATCH * cfg.embed_dim * 4
