"""Export the DLRM model, serve the bundle over real gRPC, and compare with the Flax model itself."""

import concurrent.futures
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

from clientutil import assert_served_like, infer as triton_infer, serving
from models.dlrm import DLRM, DLRMConfig
from servingutil import export_dlrm

BUCKETS = (1, 4, 16, 64)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  model = export_dlrm(repo, seed=3, buckets=BUCKETS)
  with serving(repo) as bg:
    yield bg, model, model.config


def make_inputs(rng, n, cfg, id_dtype=np.int64):
  dense = rng.normal(size=(n, cfg.num_dense)).astype(np.float32)
  sparse = rng.integers(-1, 5000, size=(n, cfg.num_sparse)).astype(id_dtype)  # -1 and > rows
  return dense, sparse


def infer(client, dense, sparse):
  """prob for one tritonclient call (the ids' datatype follows their numpy dtype)."""
  return triton_infer(client, "dlrm", {"dense": dense, "sparse": sparse}, ("prob",))["prob"]


def reference(model, dense, sparse):
  """The Flax model run directly, outside any bundle or server."""
  return np.asarray(model(jnp.asarray(dense), jnp.asarray(sparse))["prob"])


def parity(bg, model, cases) -> int:
  """Every case (dense, sparse) served exactly like the Flax model; returns how many."""
  with tc.InferenceServerClient(bg.address) as c:
    return assert_served_like(
        c, "dlrm", [{"dense": d, "sparse": s} for d, s in cases],
        lambda dense, sparse: {"prob": reference(model, dense, sparse)}, rtol=2e-5, atol=1e-6)


def test_reference_handles_missing_and_hashed_ids_by_hand():
  cfg = DLRMConfig.tiny()
  model = DLRM(cfg, rngs=nnx.Rngs(0))
  t0 = np.asarray(model.tables["t00"][...])
  from models.embedding import lookup_embeddings
  ids = jnp.array([[-1] + [0] * 25, [1000 + 7] + [0] * 25])  # table 0 has 1000 rows
  emb = np.asarray(lookup_embeddings(model.table_list(), ids))
  np.testing.assert_array_equal(emb[0, 0], np.zeros(cfg.embed_dim))
  np.testing.assert_array_equal(emb[1, 0], t0[7])


@pytest.mark.parametrize("rows", [1, 3, 16, 50, pytest.param(64, marks=pytest.mark.slow), 150])
def test_served_outputs_equal_flax_model(served, rows):
  bg, model, cfg = served
  dense, sparse = make_inputs(np.random.default_rng(rows), rows, cfg)
  assert reference(model, dense, sparse).shape == (rows, 1)
  assert parity(bg, model, [(dense, sparse)]) == 1


def test_int32_ids_are_accepted(served):
  bg, model, cfg = served
  dense, sparse = make_inputs(np.random.default_rng(9), 5, cfg, np.int32)
  assert sparse.dtype == np.int32  # sent as INT32
  assert parity(bg, model, [(dense, sparse)]) == 1


def test_cpu_model_runs_two_instances_and_reports_them(served):
  bg, _, _ = served
  want = min(2, os.cpu_count() or 1)  # below, 1-99-row requests over buckets up to 64 split
  assert bg.server.repository.get("dlrm").runner.capabilities.instances == want  # across both instances
  with tc.InferenceServerClient(bg.address) as c:
    assert [g.count for g in c.get_model_config("dlrm").config.instance_group] == [want]


def test_thousands_of_random_requests_cause_zero_compiles(served):
  bg, model, cfg = served
  rng = np.random.default_rng(0)
  sizes = rng.integers(1, 100, size=2000)
  sample = {}
  before = bg.server.compiles.outside_warmup  # earlier tests' reference runs compiled here

  def worker(chunk):
    with tc.InferenceServerClient(bg.address) as c:
      r = np.random.default_rng(int(chunk[0]))
      for i in chunk:
        dense, sparse = make_inputs(r, int(sizes[i]), cfg)
        out = infer(c, dense, sparse)
        assert out.shape == (sizes[i], 1) and np.all((out > 0) & (out < 1))
        if i % 250 == 0:
          sample[i] = (dense, sparse, out)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    list(pool.map(worker, np.array_split(np.arange(len(sizes)), 8)))
  # Read before computing references below: this process's counter sees every compile.
  assert bg.server.compiles.outside_warmup == before
  assert bg.server.compiles.warmup >= len(BUCKETS)
  text = bg.server.metrics.exposition().decode()
  assert f"xlaserve_compiles_after_warmup {float(before)}" in text
  for dense, sparse, out in sample.values():
    np.testing.assert_allclose(out, reference(model, dense, sparse), rtol=2e-5, atol=1e-6)
  batches = [line for line in text.splitlines()
             if line.startswith("xlaserve_batch_rows_count")]
  assert {l.split('bucket="')[1].split('"')[0] for l in batches} <= {str(b) for b in BUCKETS}
