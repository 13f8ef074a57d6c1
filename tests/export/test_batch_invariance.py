"""Batch-invariant scores: with `ExportConfig(deterministic=True)` a row's outputs are
bit-identical alone (the smallest bucket), in every batch bucket, at the first, middle and last
position, with random rows around it, for each demo model family: the DLRM CTR models (demo
tiny and the light CTR model), DCN-v2, the relevance cross-encoder and the two towers (rows of
one sequence bucket), and the ranking model's candidates (context model). Bits are compared,
not tolerances. The deterministic DLRM is checked against the Flax model (within float32
rounding), and the manifest of a deterministic bundle says so."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import export
from bundle import list_versions, numpy_dtype, read_manifest
from demo.models import ranker_inputs, relevance_inputs, tower_inputs
from serving.engines import SEGMENT_INPUT
from serving.repository import ModelServingConfig, default_engine_factory

BUCKETS = (1, 8, 32, 64)  # below, at and across the default 32-row tile
SEQ = (8,)


def _ctr(kind):
  from models.dlrm import DLRM, DLRMConfig
  from models.dcn_v2 import DCNv2, DCNv2Config

  if kind == "dcn_v2":
    cfg = DCNv2Config.tiny()
    model = DCNv2(cfg, rngs=nnx.Rngs(1))
  else:
    cfg = DLRMConfig.light() if kind == "ctr_light" else DLRMConfig.tiny()
    model = DLRM(cfg, rngs=nnx.Rngs(1))
  return model, dict(inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
                             export.Input("sparse", "int64", ("batch", cfg.num_sparse))])


def _relevance():
  from models.relevance import RelevanceConfig, RelevanceModel
  return RelevanceModel(RelevanceConfig.tiny(), rngs=nnx.Rngs(1)), dict(inputs=relevance_inputs())


def _two_tower():
  from models.two_tower import TwoTower, TwoTowerConfig
  return TwoTower(TwoTowerConfig.tiny(), rngs=nnx.Rngs(1)), dict(
      inputs={"query_embedding": tower_inputs()},
      signatures={"query_embedding": lambda m, **kw: m.query_embedding(**kw)})


MODELS = {"dlrm": lambda: _ctr("dlrm"), "ctr_light": lambda: _ctr("ctr_light"),
          "dcn_v2": lambda: _ctr("dcn_v2"), "relevance": _relevance, "two_tower": _two_tower}


def _engine(path):
  path = path / str(list_versions(path)[-1])
  engine = default_engine_factory()(path, read_manifest(path), ModelServingConfig())
  engine.warmup()
  return engine


def _rows(specs, n, rng, seq=SEQ[0]):
  out = {}
  for t in specs:
    dt, shape = numpy_dtype(t.dtype), (n, *[d if d > 0 else seq for d in t.shape[1:]])
    if t.name == "lengths":
      out[t.name] = rng.integers(1, seq + 1, n).astype(dt)
    elif dt.kind in "iu":
      out[t.name] = rng.integers(0, 50, shape).astype(dt)
    else:
      out[t.name] = rng.random(shape).astype(dt)
  return out


def _placed(engine, specs, probe, bucket, pos, rng, extra=None):
  """`probe`'s outputs when it sits at `pos` of a `bucket`-row batch of random rows."""
  batch = _rows(specs, bucket, rng)
  for k, v in probe.items():
    batch[k][pos] = v[0]
  out = engine.fetch(engine.dispatch(bucket=bucket, inputs={**batch, **(extra or {})}))
  return {k: np.asarray(v)[pos] for k, v in out.items()}


def _check_invariant(engine, specs, probe, rng, extra=None):
  alone = _placed(engine, specs, probe, engine.buckets[0], 0, rng, extra and extra(1))
  for bucket in engine.buckets:
    for pos in sorted({0, bucket // 2, bucket - 1}):
      got = _placed(engine, specs, probe, bucket, pos, rng, extra and extra(bucket))
      for k in alone:
        assert got[k].tobytes() == alone[k].tobytes(), (bucket, pos, k, got[k], alone[k])
  return alone


SLOW = {"ctr_light", "dcn_v2", "two_tower", "relevance"}  # opt-in (--run-slow): the dlrm and
# the context model below cover the mechanism; these cover the other layer kinds


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(MODELS)])
def test_deterministic_rows_are_bit_identical_in_every_batch(tmp_path, name):
  model, kw = MODELS[name]()
  export.export_model(model, repository=tmp_path, name=name, version=1,
                      config=export.ExportConfig(batch_buckets=BUCKETS, seq_buckets=SEQ,
                                                 deterministic=True), **kw)
  assert read_manifest(tmp_path / name / "1").serving["deterministic"] is True
  engine = _engine(tmp_path / name)
  try:
    probe = _rows(engine.inputs, 1, np.random.default_rng(42))
    got = _check_invariant(engine, engine.inputs, probe, np.random.default_rng(0))
  finally:
    engine.close()
  if name == "dlrm":  # the same model as the Flax one: only the rounding may differ
    want = model(**{k: np.asarray(v) for k, v in probe.items()})
    np.testing.assert_allclose(got["prob"], np.asarray(want["prob"])[0], rtol=1e-5, atol=1e-6)


def test_context_model_candidates_are_bit_identical_in_every_batch(tmp_path):
  from models.ranking import Ranker, RankerConfig

  cfg = RankerConfig.tiny()
  context, candidates = ranker_inputs(cfg)
  export.export_context_model(
      Ranker(cfg, rngs=nnx.Rngs(3)), repository=tmp_path, name="ranker", version=1,
      context_inputs=context, candidate_inputs=candidates,
      context_fn=lambda m, **kw: m.context(**kw), score_fn=lambda m, ctx, **kw: m.score(ctx, **kw),
      config=export.ExportConfig(batch_buckets=BUCKETS, request_buckets=(1, 2),
                                 deterministic=True))
  engine = _engine(tmp_path / "ranker")
  try:
    ctx_names = {i.name for i in context}
    user = _rows([t for t in engine.inputs if t.name in ctx_names], 1, np.random.default_rng(7))
    cand = [t for t in engine.inputs if t.name not in ctx_names]
    probe = _rows(cand, 1, np.random.default_rng(42))
    extra = lambda bucket: {**user, SEGMENT_INPUT: np.zeros(bucket, np.int32)}
    _check_invariant(engine, cand, probe, np.random.default_rng(0), extra)
  finally:
    engine.close()
