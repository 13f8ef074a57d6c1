"""`embedding_tables` served from an exported bundle by the real engine on 2, 4 and 8 devices:
the single-device outputs, one all-gather of looked-up activations (never of a table), and per
device the balanced tables' block plus the replicated dense part; also over gRPC."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

import export
import sharding_testlib as tl
from clientutil import assert_served_like, serving
from bundle import BundleError, read_manifest
from models.dcn_v2 import DCNv2, DCNv2Config
from models.dlrm import DLRM
from serving.engines import BundleEngine
from serving.repository.placement import engine_factory_for, placements_for
from serving.repository import ModelServingConfig
from sharding import collective_stats, collectives, per_device_bytes

BATCH = 8
INPUTS = [export.Input("dense", "float32", ("batch", 13)),
          export.Input("sparse", "int32", ("batch", 26))]


def _export(repo, model, name, quantization="none"):
  return export.export_model(model, repository=repo, name=name, inputs=INPUTS,
                             config=export.ExportConfig(batch_buckets=(1, 4, BATCH),
                                                        quantization=quantization))


def _run(engine, dense, sparse):
  return engine.fetch(engine.dispatch(bucket=BATCH, inputs={"dense": dense, "sparse": sparse}))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  cfg = dataclasses.replace(tl.DIVISIBLE, embedding_impl="xla")
  model = DLRM(cfg, rngs=nnx.Rngs(0))
  dense, sparse = tl.batch(cfg, BATCH)
  out = {}
  for quant in ("none", "int8_tables"):
    path = _export(repo, model, f"dlrm_{quant}", quant)
    ref = BundleEngine(path)
    ref.warmup()
    out[quant] = (path, read_manifest(path), _run(ref, dense, sparse)["prob"])
    ref.close()
  return cfg, model, dense, sparse, out


def _engine(path, manifest, n):
  placements = placements_for(ModelServingConfig(sharding="embedding_tables", devices=n), manifest)
  engine = BundleEngine(path, manifest=manifest, placements=placements)
  engine.warmup()
  return engine


@pytest.mark.parametrize("quant", ["none", pytest.param("int8_tables", marks=pytest.mark.slow)])
@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow), 8])
def test_bundle_served_table_wise(bundles, quant, n):
  cfg, model, dense, sparse, by_quant = bundles
  path, manifest, want = by_quant[quant]
  if quant == "none":  # the bundle itself is the model
    np.testing.assert_allclose(want, np.asarray(model(dense, sparse)["prob"]), rtol=1e-6,
                               atol=1e-7)
  engine = _engine(path, manifest, n)
  try:
    (placement,) = engine.placements
    tables = placement.tables
    assert len(placement.devices) == n and tables is not None
    np.testing.assert_allclose(_run(engine, dense, sparse)["prob"], want, rtol=1e-6, atol=1e-7)

    # Collectives: each device gathers its own tables' rows; one all-gather of the
    # [n, B, F_max, D] activations; never a table (or a fused block) gathered.
    params, compiled = engine.replicas[0]
    hlo = compiled[BATCH].as_text()
    stats = collective_stats(hlo)
    width = max(tables.shard.count(k) for k in range(n))
    assert stats.count["all-gather"] == 1 and stats.total_count == 1
    assert stats.nbytes["all-gather"] == n * BATCH * width * cfg.embed_dim * 4
    weights = {p.shape for p in manifest.params if len(p.shape) == 2}
    weights |= {(tables.block_rows, cfg.embed_dim), tables.fused_shape}
    for c in collectives(hlo):
      assert not {dims for _, dims in c.shapes} & weights, c

    # Per device: the replicated dense part plus one block of balanced whole tables.
    lookup = manifest.signatures["serve"].table_lookup
    dense_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                      for i, p in enumerate(manifest.params) if i not in lookup.table_leaves)
    row_bytes = cfg.embed_dim * (1 if quant == "int8_tables" else 4) + (8 if lookup.scales else 0)
    by_device = per_device_bytes(params)
    assert len(by_device) == n
    assert set(by_device.values()) == {dense_bytes + tables.block_rows * row_bytes}
    assert sum(tables.shard_rows()) == sum(cfg.table_sizes)
    assert max(tables.shard_rows()) <= sum(cfg.table_sizes) / n + max(cfg.table_sizes)
    table_bytes = sum(cfg.table_sizes) * row_bytes
    assert max(by_device.values()) < dense_bytes + table_bytes
  finally:
    engine.close()


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_dcn_v2_bundle_served_table_wise(tmp_path):
  cfg = dataclasses.replace(DCNv2Config.tiny(), embedding_impl="xla")
  model = DCNv2(cfg, rngs=nnx.Rngs(3))
  path = _export(tmp_path, model, "dcn")
  dense, sparse = tl.batch(cfg, BATCH)
  engine = _engine(path, read_manifest(path), 4)
  try:
    np.testing.assert_allclose(_run(engine, dense, sparse)["prob"],
                               np.asarray(model(dense, sparse)["prob"]), rtol=1e-6, atol=1e-7)
  finally:
    engine.close()


def test_old_bundle_without_lookup_is_refused(bundles, tmp_path):
  path, _, _ = bundles[4]["none"]
  raw = json.loads((path / "manifest.json").read_text())
  del raw["signatures"]["serve"]["table_lookup"]
  (tmp_path / "manifest.json").write_text(json.dumps(raw))
  old = read_manifest(tmp_path)
  assert old.signatures["serve"].table_lookup is None
  with pytest.raises(BundleError, match="re-export"):
    placements_for(ModelServingConfig(sharding="embedding_tables", devices=2), old)
  # Other strategies still serve it.
  assert placements_for(ModelServingConfig(sharding="embedding_rows", devices=2), old)


def test_table_wise_over_grpc(bundles, tmp_path):
  """`--devices 8 --sharding embedding_tables` through the real server and tritonclient."""
  cfg = bundles[0]
  repo = tmp_path / "repo"
  model = DLRM(cfg, rngs=nnx.Rngs(7))
  _export(repo, model, "dlrm")
  # What `xlaserve serve --devices 8 --sharding embedding_tables` builds (serving/cli.py).
  with serving(repo, engine_factory_for(), default_model_config=ModelServingConfig(
      sharding="embedding_tables", devices=8)) as bg:
    (placement,) = bg.server.repository.get("dlrm").runner.engine.placements
    assert len(placement.devices) == 8 and placement.tables is not None
    rng = np.random.default_rng(0)
    cases = [{"dense": rng.normal(size=(rows, 13)).astype(np.float32),
              "sparse": rng.integers(-1, 3000, size=(rows, 26)).astype(np.int32)}
             for rows in (1, 3, 8, 13)]  # 13 rows: split over two batches
    with tc.InferenceServerClient(bg.address) as c:
      checked = assert_served_like(c, "dlrm", cases, lambda dense, sparse: model(
          jnp.asarray(dense), jnp.asarray(sparse)), rtol=1e-6, atol=1e-7)
    assert checked == 4
