"""Sharded models serve over gRPC exactly like unsharded ones (virtual CPU devices)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import assert_served_like, serving
from serving.repository.placement import engine_factory_for
from servingutil import DLRM_TABLE_SIZES_DIVISIBLE, export_dlrm


@pytest.fixture(scope="module")
def bundle_repo(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  return repo, export_dlrm(repo, seed=5, buckets=(1, 4, 8),
                           table_sizes=DLRM_TABLE_SIZES_DIVISIBLE)


@pytest.mark.parametrize("strategy,devices", [pytest.param("replicated", 2, marks=pytest.mark.slow),
                                              pytest.param("tensor", 4, marks=pytest.mark.slow),
                                              ("tensor+data", 8), ("embedding_rows", 8)])
def test_sharded_dlrm_serves_same_outputs(bundle_repo, strategy, devices):
  repo, model = bundle_repo
  assert len(jax.devices()) >= devices
  (repo / "dlrm" / "config.json").write_text(json.dumps({"sharding": strategy,
                                                          "devices": devices}))
  with serving(repo, engine_factory_for()) as bg:
    rec = bg.server.repository.get("dlrm")
    placements = rec.runner.engine.placements
    assert len(placements) == (devices if strategy == "replicated" else 1)
    assert sum(len(p.devices) for p in placements) == devices
    # Single-device CPU replicas run two batches at once; a mesh (collectives) runs one.
    assert rec.runner.capabilities.instances == (min(2, os.cpu_count() or 1) if strategy == "replicated"
                                    else 1)
    rng = np.random.default_rng(devices)
    cases = [{"dense": rng.normal(size=(rows, 13)).astype(np.float32),
              "sparse": rng.integers(-1, 3000, size=(rows, 26))}  # int64: missing and hashed ids
             for rows in (1, 3, 8, 13)]  # 13 rows: split over two batches
    with tc.InferenceServerClient(bg.address) as c:
      checked = assert_served_like(c, "dlrm", cases, lambda dense, sparse: model(
          jnp.asarray(dense), jnp.asarray(sparse)), rtol=1e-5, atol=1e-6)
    assert checked == 4
