"""The engine's path: an exported bundle's params restored straight into a plan's layout, and its
1-device StableHLO run under jit with the plan's shardings (XLA partitions it)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

import export
import sharding_testlib as tl
from bundle import read_manifest, restore_params
from models.dlrm import DLRM
from sharding import ShardingPlan, collective_stats, per_device_bytes

BATCH = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  # impl="xla": GSPMD partitions the jnp lookup (masked local gather + all-reduce); a Pallas
  # custom call would not be partitioned (and "auto" traces the CUDA branch at export).
  cfg = dataclasses.replace(tl.DIVISIBLE, embedding_impl="xla")
  model = DLRM(cfg, rngs=nnx.Rngs(0))
  path = export.export_model(
      model, repository=tmp_path_factory.mktemp("repo"), name="dlrm",
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int32", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=(1, BATCH)))
  dense, sparse = tl.batch(cfg, BATCH)
  want = np.asarray(model(dense, sparse)["prob"])
  return path, read_manifest(path), dense, sparse, want


@pytest.mark.parametrize("strategy", ["tensor+data", "embedding_rows"])
def test_exported_model_runs_sharded(bundle, strategy):
  path, manifest, dense, sparse, want = bundle
  specs = manifest.params
  plan = ShardingPlan.create(strategy, 4)
  shardings = plan.param_shardings([p.logical_axes for p in specs], [p.shape for p in specs])
  params = restore_params(path, manifest, shardings)
  assert [p.sharding for p in params] == shardings
  exported = jax.export.deserialize(
      bytearray((path / manifest.signatures["serve"].artifacts["cpu"]).read_bytes()))
  in_sh = {t.name: plan.input_sharding(len(t.shape), batch=BATCH)
           for t in manifest.signatures["serve"].inputs}
  compiled = jax.jit(exported.call, in_shardings=(shardings, in_sh)).lower(
      params, {"dense": dense, "sparse": sparse}).compile()
  out = compiled(params, {"dense": dense, "sparse": sparse})
  np.testing.assert_allclose(np.asarray(out["prob"]), want, rtol=1e-6, atol=1e-7)
  stats = collective_stats(compiled.as_text())
  by_device = per_device_bytes(params)
  total = sum(int(np.prod(p.shape)) * 4 for p in specs)
  assert len(by_device) == 4 and max(by_device.values()) < total
  if strategy == "embedding_rows":
    assert stats.nbytes["all-reduce"] == tl.DIVISIBLE.num_sparse * BATCH * 8 * 4
    assert stats.count["all-gather"] == 0
  else:  # 2x2: batch over data, Megatron pairs over model
    assert stats.count["all-reduce"] == 2
