"""DLRM lookups through the embedding-bag dispatcher, the synthetic click log, and brief training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from export.quantize import quantize_model
from models.dlrm import DLRM, DLRMConfig
from models.embedding import QuantizedTable, lookup_embeddings, table_arrays
from models.synthetic import ClickLogConfig, PlantedModel, log_loss, roc_auc
from models.train import (
    HELD_OUT_STREAM,
    TRAIN_STREAM,
    TrainConfig,
    evaluate,
    predict,
    train_demo_dlrm,
)

CFG = DLRMConfig.tiny()


# ----------------------------------------------------------------------------- lookups


def test_lookup_by_hand_float_and_8bit_tables():
  t0 = jnp.arange(12.0).reshape(4, 3)  # rows [0 1 2], [3 4 5], ...
  t1 = jnp.array([[1.0, -1.0, 0.5], [2.0, 0.0, -2.0]])
  ids = np.array([[0, 1], [5, -1], [-7, 3], [3, 2]])  # 5 % 4 = 1; any negative id is missing
  want = np.array([[[0, 1, 2], [2, 0, -2]],
                   [[3, 4, 5], [0, 0, 0]],
                   [[0, 0, 0], [2, 0, -2]],
                   [[9, 10, 11], [1, -1, 0.5]]], np.float32)
  for dtype in (np.int32, np.int64):
    got = lookup_embeddings([t0, t1], ids.astype(dtype))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)
  # 8-bit tables: a row's min and max land exactly on codes, the rest within half a step
  # (max - min) / 510; a float table beside them needs no scale.
  q0, q1 = QuantizedTable.from_table(t0), QuantizedTable.from_table(t1)
  tables, scales, offsets = table_arrays([q0, nnx.Param(t1)])
  assert tables[0].dtype == jnp.int8 and scales[1] is None and offsets[1] is None
  got = lookup_embeddings(tables, ids, scales=scales, offsets=offsets)
  np.testing.assert_allclose(got, want, atol=2 / 510 + 1e-6)
  # Row min and max: exact on CPU; XLA GPU's division may leave the scale an ulp off.
  np.testing.assert_allclose(got[:, :, [0, 2]], want[:, :, [0, 2]], rtol=4e-7, atol=4e-7)
  tables, scales, offsets = table_arrays([q0, q1])
  np.testing.assert_allclose(lookup_embeddings(tables, ids, "xla", scales=scales,
                                               offsets=offsets), want, atol=4 / 510 + 1e-6)
  assert table_arrays([nnx.Param(t0), t1])[1] is None
  with pytest.raises(ValueError, match="one id per table"):
    lookup_embeddings([t0], ids)


def test_dlrm_matches_plain_gather_forward():
  """The dispatcher path computes what a plain jnp.take model computes."""
  model = DLRM(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  dense = jnp.asarray(rng.normal(size=(6, 13)).astype(np.float32))
  sparse = jnp.asarray(rng.integers(-2, 3000, size=(6, 26)))
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, dense, sparse):
    m = nnx.merge(graphdef, state)
    emb = m.embed(sparse)
    return emb, m(dense, sparse)["prob"], jax.nn.sigmoid(m.logits_from_embeddings(dense, emb))

  emb, prob, prob_from_emb = run(state, dense, sparse)
  for f, table in enumerate(model.table_list()):
    ids = np.asarray(sparse[:, f])
    rows = np.where(ids >= 0, ids % table.shape[0], 0)
    want = np.where((ids >= 0)[:, None], np.asarray(table)[rows], 0)
    np.testing.assert_array_equal(emb[:, f], want)
  np.testing.assert_allclose(prob, prob_from_emb, rtol=1e-6)


def test_cuda_lowering_runs_the_kernels():
  """impl="auto" lowers the Triton kernels for CUDA (no GPU needed): 26 embedding bags, and the
  quantized matmuls once Dense layers are quantized; 8-bit tables go through the same kernel."""
  model = quantize_model(DLRM(CFG, rngs=nnx.Rngs(0)), "int8_act+int8_tables")
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, d, s: nnx.merge(graphdef, st)(d, s)["prob"])
  text = fn.trace(state, jax.ShapeDtypeStruct((8, 13), jnp.float32),
                  jax.ShapeDtypeStruct((8, 26), jnp.int64)).lower(
                      lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 26 + 5
  assert 'name = "embedding_bag_sum"' in text and 'name = "quantized_matmul_w8a8"' in text


# ----------------------------------------------------------------------------- synthetic log


def test_auc_and_log_loss_by_hand():
  assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
  assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count half
  assert roc_auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
  assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
  assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))
  assert log_loss([1, 0], [0.9, 0.2]) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2)


def test_click_log_is_deterministic_zipf_and_has_a_signal():
  cfg = ClickLogConfig.for_dlrm(CFG)
  a = PlantedModel.create(cfg, seed=3).sample(20_000, TRAIN_STREAM)
  b = PlantedModel.create(cfg, seed=3).sample(20_000, TRAIN_STREAM)
  for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b)):
    np.testing.assert_array_equal(x, y)
  held = PlantedModel.create(cfg, seed=3).sample(20_000, HELD_OUT_STREAM)
  assert not np.array_equal(a.sparse, held.sparse)
  other = PlantedModel.create(cfg, seed=4).sample(20_000, TRAIN_STREAM)
  assert not np.array_equal(a.logits, other.logits)
  assert a.dense.shape == (20_000, 13) and a.sparse.shape == (20_000, 26)
  assert a.sparse.max() < 1000 and 0.02 < np.mean(a.sparse == -1) < 0.04
  _, counts = np.unique(a.sparse[:, 0][a.sparse[:, 0] >= 0], return_counts=True)
  assert counts.max() / counts.sum() > 0.1  # Zipf: the hottest of 1000 ids takes > 10%
  assert 0.15 < a.labels.mean() < 0.35
  assert roc_auc(held.labels, held.logits) > 0.8  # the planted model itself


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained():
  model, report = train_demo_dlrm(CFG, seed=0, train=TrainConfig.tiny(), held_out_rows=4096)
  held = PlantedModel.create(ClickLogConfig.for_dlrm(CFG), 0).sample(4096, HELD_OUT_STREAM)
  return model, report, held


def test_planted_signal_is_learnable(trained):
  model, report, held = trained
  assert report.held_out_auc > 0.6 and report.held_out_auc == evaluate(model, held)["auc"]
  assert report.held_out_auc < report.oracle_auc + 0.02  # nothing beats the planted model
  assert report.last_loss < report.first_loss
  untrained = evaluate(DLRM(CFG, rngs=nnx.Rngs(0)), held)
  assert abs(untrained["auc"] - 0.5) < 0.05
  assert report.held_out_log_loss < untrained["log_loss"]


def test_training_leaves_param_structure_alone(trained):
  model, _, _ = trained
  fresh = DLRM(CFG, rngs=nnx.Rngs(0))
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))
  assert shapes(model) == shapes(fresh)


def test_int8_everything_keeps_the_trained_auc(trained):
  model, report, held = trained
  p = predict(quantize_model(model, "int8+int8_tables"), held)
  assert abs(roc_auc(held.labels, p) - report.held_out_auc) < 0.001
