"""DCN-v2: the cross layer by hand, and served outputs over gRPC equal the Flax model."""

import concurrent.futures

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

from clientutil import assert_served_like, infer, serving
from demo.models import build_dcn_v2
from models.dcn_v2 import CrossLayer, DCNv2, DCNv2Config
from seqserve import check_logical_axes, reference

BATCH = (1, 4, 16)
SEED = 11


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  build_dcn_v2(repo, tiny=True, seed=SEED, batch_buckets=BATCH)
  with serving(repo) as bg:
    cfg = DCNv2Config.tiny()
    yield bg, reference(DCNv2(cfg, rngs=nnx.Rngs(SEED))), cfg


def features(rng, rows, cfg, id_dtype=np.int64):
  return {"dense": rng.normal(size=(rows, cfg.num_dense)).astype(np.float32),
          "sparse": rng.integers(-1, 3000, size=(rows, cfg.num_sparse)).astype(id_dtype)}


def test_cross_layer_by_hand():
  layer = CrossLayer(2, None, rngs=nnx.Rngs(0))
  layer.w.kernel[...] = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  layer.w.bias[...] = jnp.array([0.5, -1.0])
  x0, x = jnp.array([[1.0, 2.0]]), jnp.array([[3.0, 4.0]])
  # x @ W + b = [15.5, 21]; x0 * that + x = [18.5, 46]
  np.testing.assert_allclose(layer(x0, x), [[18.5, 46.0]])


def test_low_rank_cross_layer_is_the_product_of_its_factors():
  low = CrossLayer(6, 2, rngs=nnx.Rngs(1))
  full = CrossLayer(6, None, rngs=nnx.Rngs(2))
  full.w.kernel[...] = low.u.kernel[...] @ low.v.kernel[...]
  full.w.bias[...] = low.v.bias[...]
  x0, x = jnp.arange(12.0).reshape(2, 6) / 10, jnp.ones((2, 6))
  np.testing.assert_allclose(low(x0, x), full(x0, x), rtol=1e-5)


@pytest.mark.parametrize("cfg", [DCNv2Config.tiny(), DCNv2Config.demo()], ids=["tiny", "demo"])
def test_params_name_logical_axes(cfg):
  check_logical_axes(nnx.eval_shape(lambda: DCNv2(cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_served_outputs_equal_flax_model(served, rows):
  bg, run, cfg = served
  x = features(np.random.default_rng(rows), rows, cfg)
  with tc.InferenceServerClient(bg.address) as c:
    assert assert_served_like(c, "dcn_v2", [x], run, rtol=2e-5, atol=1e-6) == 1
    got = infer(c, "dcn_v2", x, ["prob"])["prob"]
  assert got.shape == (rows, 1) and np.all((got > 0) & (got < 1))


def test_int32_ids_and_random_sizes_cause_zero_compiles(served):
  bg, run, cfg = served
  before = bg.server.compiles.outside_warmup
  rng = np.random.default_rng(0)
  cases = [features(rng, int(n), cfg, np.int32 if n % 2 else np.int64)
           for n in rng.integers(1, 40, 80)]

  def call(x):
    with tc.InferenceServerClient(bg.address) as c:
      return infer(c, "dcn_v2", x, ["prob"])["prob"]

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(call, cases))
  assert bg.server.compiles.outside_warmup == before
  for x, got in list(zip(cases, results))[::40]:  # each row count compiles the reference once
    np.testing.assert_allclose(got, run(**x)["prob"], rtol=2e-5, atol=1e-6)
