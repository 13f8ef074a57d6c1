"""export.quantize: names, the NNX transformation, round trips, per-mode accuracy and param bytes.

Tolerances: tests/quant_tolerance.py (shared with tests/models/test_quantized_serving.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export
from export.quantize import (
    QUANTIZATIONS,
    QuantizationSpec,
    dequantize_model,
    param_bytes,
    quantize_for_export,
    quantize_model,
)
from models.dlrm import DLRM, DLRMConfig
from models.embedding import QuantizedTable
from models.layers import MLP, Dense
from quant_tolerance import DLRM_PROB_TOLERANCE

TOLERANCE = DLRM_PROB_TOLERANCE
CFG = DLRMConfig.tiny()


@pytest.fixture(scope="module")
def model():
  return DLRM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  dense = rng.normal(size=(256, CFG.num_dense)).astype(np.float32)
  sparse = rng.integers(-3, 5000, size=(256, CFG.num_sparse)).astype(np.int64)
  return jnp.asarray(dense), jnp.asarray(sparse)


@pytest.fixture(scope="module")
def float_prob(model, batch):
  return prob(model, batch)


def prob(m, batch):
  graphdef, state = nnx.split(m)
  fn = jax.jit(lambda st, d, s: nnx.merge(graphdef, st)(d, s)["prob"])
  return np.asarray(fn(state, *batch))


def flat(m):
  """(path, shape, dtype, logical_axes) of every param, in export order."""
  graphdef, state = nnx.split(m)
  out = []
  for path, var in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    out.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(var.shape),
                str(var[...].dtype), var.get_metadata().get("logical_axes")))
  return out


def test_names_parse_into_dense_mode_and_tables():
  assert QUANTIZATIONS == ("none", "int8", "int8_act", "fp8", "int8_tables", "int8+int8_tables",
                           "int8_act+int8_tables", "fp8+int8_tables")
  assert QuantizationSpec.parse("none") == QuantizationSpec("none", False)
  assert QuantizationSpec.parse("int8") == QuantizationSpec("w8a16", False)
  assert QuantizationSpec.parse("int8_act") == QuantizationSpec("w8a8", False)
  assert QuantizationSpec.parse("fp8+int8_tables") == QuantizationSpec("fp8", True)
  assert QuantizationSpec.parse("int8_tables") == QuantizationSpec("none", True)
  for bad in ("int4", "int8_tables+int8", "INT8", "int8+fp8", ""):
    with pytest.raises(ValueError, match="must be one of"):
      quantize_for_export(None, bad)


def test_float_model_params_are_unchanged(model):
  """The float model keeps its param names, shapes and axes (sharding and bundles rely on them)."""
  params = flat(model)
  assert [p for p, *_ in params[:4]] == ["bottom/layers/0/bias", "bottom/layers/0/kernel",
                                         "bottom/layers/1/bias", "bottom/layers/1/kernel"]
  tables = [p for p in params if p[0].startswith("tables/")]
  assert [p[0] for p in tables] == [f"tables/t{f:02d}" for f in range(26)]
  assert all(p[1] == (rows, 8) and p[2] == "float32" and p[3] == ("table_rows", "embed")
             for p, rows in zip(tables, CFG.table_sizes))
  assert quantize_for_export(model, "none") is model


@pytest.mark.parametrize("mode", QUANTIZATIONS[1:])
def test_quantized_params_dtypes_and_logical_axes(model, mode):
  spec = QuantizationSpec.parse(mode)
  q = quantize_model(model, mode)
  params = {p: (shape, dtype, axes) for p, shape, dtype, axes in flat(q)}
  assert all(axes is not None for _, _, axes in params.values())  # sharding resolves every param
  kernel_dtype = {"none": "float32", "w8a16": "int8", "w8a8": "int8", "fp8": "float8_e4m3fn"}
  k = "" if spec.dense == "none" else "_q"
  assert params[f"top/layers/0/kernel{k}"] == ((8 + 351, 32), kernel_dtype[spec.dense],
                                              ("embed", "mlp"))
  assert params[f"top/layers/1/kernel{k}"][2] == ("mlp", "embed")
  if spec.dense != "none":
    assert params["top/layers/0/kernel_scale"] == ((32,), "float32", ("mlp",))
    assert params["top/layers/1/kernel_scale"] == ((16,), "float32", ("embed",))
    assert params["top/layers/0/bias"][1] == "float32"
  if spec.tables:
    assert params["tables/t00/codes"] == ((1000, 8), "int8", ("table_rows", "embed"))
    assert params["tables/t00/scale"] == ((1000,), "float32", ("table_rows",))
    assert params["tables/t00/offset"] == ((1000,), "float32", ("table_rows",))
    assert "tables/t00" not in params
  else:
    assert params["tables/t00"] == ((1000, 8), "float32", ("table_rows", "embed"))


def test_quantize_leaves_the_input_model_alone(model):
  before = flat(model)
  values = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model))]
  quantize_model(model, "int8_act+int8_tables")
  assert flat(model) == before
  for a, b in zip(values, jax.tree.leaves(nnx.state(model))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", QUANTIZATIONS[1:])
def test_round_trip_restores_float_model_within_a_quantization_step(model, mode):
  """dequantize(quantize(m)) has m's params exactly (names, shapes, dtypes, axes), values within
  half a code step; quantizing it again gives the same codes."""
  q = quantize_model(model, mode)
  back = dequantize_model(q)
  assert flat(back) == flat(model)
  spec = QuantizationSpec.parse(mode)
  orig = nnx.to_flat_state(nnx.state(model, nnx.Param))
  rt = dict(nnx.to_flat_state(nnx.state(back, nnx.Param)))
  for path, var in orig:
    w, w2 = np.asarray(var[...]), np.asarray(rt[path][...])
    if path[0] == "tables" and spec.tables:
      step = (w.max(axis=1) - w.min(axis=1)) / 255  # per row
      assert np.all(np.abs(w - w2) <= step[:, None] * 0.5 + 1e-6)
    elif path[-1] == "kernel" and spec.dense != "none":
      amax = np.abs(w).max(axis=0)  # per output channel
      if spec.dense == "fp8":  # e4m3: 3 mantissa bits, relative half-ulp 2^-4 (subnormals: abs)
        assert np.all(np.abs(w - w2) <= np.maximum(np.abs(w) * 2.0 ** -4, amax / 448 * 2.0 ** -9))
      else:
        assert np.all(np.abs(w - w2) <= amax / 127 * 0.5 + 1e-7)
    else:
      np.testing.assert_array_equal(w, w2)  # biases and untouched params are exact
  again = quantize_model(back, mode)
  codes = lambda m: [np.asarray(v[...]).astype(np.float32) for p, v in nnx.to_flat_state(
      nnx.state(m, nnx.Param)) if p[-1] in ("kernel_q", "codes")]
  for a, b in zip(codes(q), codes(again)):
    assert np.mean(a != b) < 0.01 and np.abs(a - b).max() <= 1  # float rounding at half-steps


@pytest.mark.parametrize("mode", QUANTIZATIONS)
def test_quantized_output_within_tolerance_of_float(model, batch, float_prob, mode):
  want = float_prob
  got = prob(quantize_model(model, mode), batch)
  err = np.abs(got - want)
  assert err.max() <= TOLERANCE[mode], f"{mode}: max |dprob| {err.max():.4f}"
  if mode != "none":
    assert err.max() > 0  # the quantized path really ran


def test_param_bytes_shrink_as_expected(model):
  f = param_bytes(model)
  rows, d = sum(CFG.table_sizes), CFG.embed_dim
  assert f["embeddings"] == rows * d * 4
  kernels = [l.kernel[...].shape for l in (*model.bottom.layers, *model.top.layers)]
  k_elems = sum(a * b for a, b in kernels)
  out_ch = sum(b for _, b in kernels)  # biases and scales: one per output channel
  assert f["dense"] == (k_elems + out_ch) * 4
  for mode in QUANTIZATIONS[1:]:
    spec = QuantizationSpec.parse(mode)
    b = param_bytes(quantize_model(model, mode))
    want_dense = (k_elems + out_ch) * 4 if spec.dense == "none" else k_elems + 2 * out_ch * 4
    want_emb = rows * (d + 8) if spec.tables else rows * d * 4  # codes + f32 scale and offset
    assert (b["dense"], b["embeddings"]) == (want_dense, want_emb), mode
    assert b["total"] < f["total"]
  # At the demo's D=64 the tables shrink 256 / 72 = 3.6x; at tiny's D=8, 32 / 16 = 2x.
  assert param_bytes(quantize_model(model, "int8_tables"))["embeddings"] * 2 == f["embeddings"]


def test_dense_switches_both_ways_in_place():
  layer = Dense(5, 3, rngs=nnx.Rngs(0), axes=("mlp", "embed"))
  x = jax.random.normal(jax.random.key(1), (2, 4, 5))  # any leading dims
  want = layer(x)
  w = layer.kernel[...]
  layer.quantize("w8a16")
  assert layer.quantization == "w8a16" and not hasattr(layer, "kernel")
  assert layer(x).shape == (2, 4, 3)
  np.testing.assert_allclose(layer(x), want, atol=0.02)
  with pytest.raises(ValueError, match="already quantized"):
    layer.quantize("fp8")
  layer.dequantize()
  assert layer.axes == ("mlp", "embed")
  np.testing.assert_allclose(layer.kernel[...], w, atol=float(np.abs(w).max()) / 254 + 1e-7)
  with pytest.raises(ValueError, match="must be one of"):
    layer.quantize("int4")


def test_any_models_layers_model_quantizes_and_tables_need_tables():
  mlp = MLP(6, (16, 4), rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(0), (9, 6))
  want = np.asarray(mlp(x))
  for mode in ("int8", "int8_act", "fp8"):
    got = np.asarray(quantize_model(mlp, mode)(x))
    assert np.abs(got - want).max() <= 0.08 * np.abs(want).max()
  with pytest.raises(ValueError, match="no \\('table_rows'"):
    quantize_model(mlp, "int8_tables")
  with pytest.raises(ValueError, match="no models.layers.Dense"):
    quantize_model(nnx.Dict({"t": nnx.Param(jnp.ones((4, 2)), logical_axes=("table_rows", "embed"))}),
                   "int8")


def test_quantized_table_refuses_array_access():
  t = QuantizedTable.from_table(jnp.arange(12.0).reshape(3, 4))
  np.testing.assert_allclose(t.dequantized(), np.arange(12.0).reshape(3, 4), atol=3 / 510 + 1e-6)
  with pytest.raises(TypeError, match="table_arrays"):
    t[...]


def test_export_writes_quantized_params_and_mode(model, tmp_path):
  path = export.export_model(
      model, repository=tmp_path, name="q",
      inputs=[export.Input("dense", "float32", ("batch", 13)),
              export.Input("sparse", "int64", ("batch", 26))],
      config=export.ExportConfig(batch_buckets=(1, 2), quantization="int8+int8_tables"))
  manifest = export.read_manifest(path)
  assert manifest.quantization == "int8+int8_tables"
  by_path = {p.path: p for p in manifest.params}
  assert by_path["tables/t00/codes"].dtype == "int8"
  assert by_path["top/layers/0/kernel_q"].dtype == "int8"
  assert by_path["top/layers/0/kernel_scale"].logical_axes == ("mlp",)
  assert flat(model)[1][2] == "float32"  # export did not touch the caller's model
