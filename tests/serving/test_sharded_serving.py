"""Sharded models serve over gRPC exactly like unsharded ones (virtual CPU devices)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

import export
from models.dlrm import DLRM, DLRMConfig
from serving.repository.placement import engine_factory_for
from serving.repository import ModelServingConfig
from serving.server import BackgroundServer, Server, ServerConfig


@pytest.fixture(scope="module")
def bundle_repo(tmp_path_factory):
  cfg = dataclasses.replace(DLRMConfig.tiny(), table_sizes=(1024, 512, 96, 64) + (16,) * 22)
  model = DLRM(cfg, rngs=nnx.Rngs(5))
  repo = tmp_path_factory.mktemp("repo")
  export.export_model(model, repository=repo, name="dlrm",
                      inputs=[export.Input("dense", "float32", ("batch", 13)),
                              export.Input("sparse", "int64", ("batch", 26))],
                      config=export.ExportConfig(batch_buckets=(1, 4, 8)))
  return repo, model


@pytest.mark.parametrize("strategy,devices", [("replicated", 2), ("tensor", 4),
                                              ("tensor+data", 8), ("embedding_rows", 8)])
def test_sharded_dlrm_serves_same_outputs(bundle_repo, strategy, devices):
  repo, model = bundle_repo
  assert len(jax.devices()) >= devices
  (repo / "dlrm" / "config.json").write_text(json.dumps({"sharding": strategy,
                                                          "devices": devices}))
  config = ServerConfig(model_repository=str(repo), grpc_port=0, metrics_port=-1)
  bg = BackgroundServer(Server(config, engine_factory=engine_factory_for(config))).start()
  try:
    rec = bg.server.repository.get("dlrm")
    placements = rec.runner.engine.placements
    assert len(placements) == (devices if strategy == "replicated" else 1)
    assert sum(len(p.devices) for p in placements) == devices
    # Single-device CPU replicas run two batches at once; a mesh (collectives) runs one.
    assert rec.runner.instances == (min(2, os.cpu_count() or 1) if strategy == "replicated"
                                    else 1)
    rng = np.random.default_rng(devices)
    with tc.InferenceServerClient(bg.address) as c:
      for rows in (1, 3, 8, 13):
        dense = rng.normal(size=(rows, 13)).astype(np.float32)
        sparse = rng.integers(-1, 3000, size=(rows, 26))
        ins = [tc.InferInput("dense", [rows, 13], "FP32"),
               tc.InferInput("sparse", [rows, 26], "INT64")]
        ins[0].set_data_from_numpy(dense)
        ins[1].set_data_from_numpy(sparse)
        got = c.infer("dlrm", ins).as_numpy("prob")
        want = np.asarray(model(jnp.asarray(dense), jnp.asarray(sparse))["prob"])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  finally:
    bg.stop()
