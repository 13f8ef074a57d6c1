"""Quantized bundles over real gRPC: quantized DLRMs (and a plain models.layers MLP) exported,
served by one BackgroundServer on 127.0.0.1, and called with tritonclient.

Served outputs must equal the quantized Flax model run in-process (same computation: float32
rounding only) and stay within the per-mode tolerance of the float32 Flax model, at every bucket.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

import export
from clientutil import assert_served_like, infer, serving
from export.quantize import quantize_model
from models.dlrm import DLRM, DLRMConfig
from models.layers import MLP
from quant_tolerance import DLRM_PROB_TOLERANCE

BUCKETS = (1, 8)  # compiling a DLRM bucket takes ~2 s on 2 shared cores
# Max |prob - float32 prob| per mode (tests/quant_tolerance.py); served float32 bundles differ from
# the Flax model by rounding only.
TOLERANCE = DLRM_PROB_TOLERANCE | {"none": 2e-5}
# Every quantized code path in three bundles (each dense mode, each with 8-bit tables); each single
# mode is checked against the float model in tests/export/test_quantize.py, and float bundles are
# served in tests/serving/test_dlrm_e2e.py.
SERVED = ("int8+int8_tables", "int8_act+int8_tables", "fp8+int8_tables")
SIZES = (1, 3, 8, 20)  # buckets 1 and 8 (padded), and a request split over buckets
MLP_MODES = ("int8_act",)


def model_name(mode: str) -> str:
  return "dlrm_" + mode.replace("+", "_")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  cfg = DLRMConfig.tiny()
  model = DLRM(cfg, rngs=nnx.Rngs(5))
  mlp = MLP(12, (32, 16, 3), rngs=nnx.Rngs(6))
  repo = tmp_path_factory.mktemp("qrepo")
  config = lambda q: export.ExportConfig(batch_buckets=BUCKETS, quantization=q)
  for q in SERVED:
    export.export_model(
        model, repository=repo, name=model_name(q),
        inputs=[export.Input("dense", "float32", ("batch", 13)),
                export.Input("sparse", "int64", ("batch", 26))], config=config(q))
  for q in MLP_MODES:
    export.export_model(mlp, repository=repo, name=f"mlp_{q}", output_names=["y"],
                        inputs=[export.Input("x", "float32", ("batch", 12))], config=config(q))
  with serving(repo) as bg:
    yield bg, repo, model, mlp


def make_inputs(rng, n):
  dense = rng.normal(size=(n, 13)).astype(np.float32)
  sparse = rng.integers(-1, 5000, size=(n, 26)).astype(np.int64)  # missing and hashed ids
  return dense, sparse


def flax_prob(model, dense, sparse):
  """The Flax model itself, jitted (one shape: every request's rows together)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, d, s: nnx.merge(graphdef, st)(d, s)["prob"])
  return np.asarray(fn(state, jnp.asarray(dense), jnp.asarray(sparse)))


def split_requests(rows):
  """`rows` cut into one block per request, SIZES[i] rows each."""
  return np.split(rows, np.cumsum(SIZES)[:-1])


def per_request(prob):
  """A reference for `assert_served_like`: each request (told apart by its row count) answered
  with its own rows of `prob`, the Flax model's output for every request's rows together."""
  return lambda dense, sparse: {"prob": dict(zip(SIZES, split_requests(prob)))[len(dense)]}


@pytest.fixture(scope="module")
def requests(served):
  """The rows every DLRM test sends, and the float32 Flax model's outputs for them."""
  _, _, model, _ = served
  dense, sparse = make_inputs(np.random.default_rng(7), sum(SIZES))
  return dense, sparse, flax_prob(model, dense, sparse)


@pytest.mark.parametrize("mode", SERVED)
def test_served_quantized_dlrm_matches_flax(served, requests, mode):
  bg, _, model, _ = served
  dense, sparse, want_f = requests
  assert len(set(SIZES)) == len(SIZES)  # per_request tells requests apart by their row count
  cases = [{"dense": d, "sparse": s} for d, s in zip(split_requests(dense), split_requests(sparse))]
  want_q = flax_prob(quantize_model(model, mode), dense, sparse)
  assert want_q.shape == want_f.shape == (sum(SIZES), 1)  # so each request's answer is (n, 1)
  with tc.InferenceServerClient(bg.address) as c:
    # The same quantized computation, then the float32 model within the mode's tolerance.
    assert assert_served_like(c, model_name(mode), cases, per_request(want_q),
                              rtol=2e-5, atol=2e-6) == len(SIZES)
    assert assert_served_like(c, model_name(mode), cases, per_request(want_f),
                              rtol=0, atol=TOLERANCE[mode]) == len(SIZES)


@pytest.mark.parametrize("mode", MLP_MODES)
def test_served_quantized_mlp_matches_flax(served, mode):
  """Any models.layers model exports quantized, not only the DLRM."""
  bg, _, _, mlp = served
  x = np.random.default_rng(0).normal(size=(7, 12)).astype(np.float32)
  with tc.InferenceServerClient(bg.address) as c:
    got = infer(c, f"mlp_{mode}", {"x": x}, ["y"])["y"]
  want_q = np.asarray(quantize_model(mlp, mode)(jnp.asarray(x)))
  want_f = np.asarray(mlp(jnp.asarray(x)))
  np.testing.assert_allclose(got, want_q, rtol=2e-5, atol=2e-6)
  # Unbounded outputs: relative to the output scale, the int8 and fp8 weight-error budgets.
  scale = np.abs(want_f).max()
  assert np.abs(got - want_f).max() <= {"int8": 0.02, "int8_act": 0.04, "fp8": 0.08}[mode] * scale


def test_bundles_record_quantized_params(served):
  _, repo, _, _ = served
  for mode in SERVED:
    manifest = json.loads((repo / model_name(mode) / "1" / "manifest.json").read_text())
    assert manifest["quantization"] == mode
    dtypes = {p["dtype"] for p in manifest["params"]}
    assert ("int8" in dtypes) == (mode != "fp8")
    assert ("float8_e4m3fn" in dtypes) == mode.startswith("fp8")
    assert all(p["logical_axes"] is not None for p in manifest["params"])
    table_codes = [p for p in manifest["params"] if p["path"].endswith("codes")]
    assert len(table_codes) == (26 if "int8_tables" in mode else 0)
