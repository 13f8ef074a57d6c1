"""export_context_model: a plain apply function with a one-array context part, exported in two
parts and run by ContextEngine on a hand-built batch (three requests padded to a request
bucket, candidates padded to a batch bucket, a segment map) against numpy; the manifest
describes the split; mistakes are refused at export with what to change."""

import numpy as np
import pytest

import export
from bundle import read_manifest
from serving.engines import SEGMENT_INPUT, ContextEngine

USER = [export.Input("user", "float32", ("batch", 3))]
ADS = [export.Input("ad", "float32", ("batch", 2))]
PARAMS = {"w_user": np.arange(12, dtype=np.float32).reshape(3, 4) / 10,
          "w_ad": np.arange(8, dtype=np.float32).reshape(2, 4) / 10 - 0.3}


def apply(p, inputs):  # the flat model (unused by the export, here for the reader)
  raise NotImplementedError


def context_fn(p, user):
  return user @ p["w_user"]  # one array: served as the feature "context"


def score_fn(p, ctx, ad):
  return {"score": (ctx * (ad @ p["w_ad"])).sum(axis=1, keepdims=True)}


def export_toy(repo, **kw):
  return export.export_context_model(
      apply, params=PARAMS, repository=repo, name="toy", context_inputs=USER,
      candidate_inputs=ADS, context_fn=context_fn, score_fn=score_fn,
      config=export.ExportConfig(batch_buckets=(2, 8), request_buckets=(1, 4)), **kw)


def test_manifest_describes_the_split(tmp_path):
  sig = read_manifest(export_toy(tmp_path)).signatures["serve"]
  assert [(t.name, t.shape) for t in sig.inputs] == [("user", (1, 3)), ("ad", (-1, 2))]
  assert sig.context.inputs == ("user",)
  assert [(t.name, t.shape) for t in sig.context.features] == [("context", (-1, 4))]
  assert sig.context.request_buckets == (1, 4)
  assert [t.name for t in sig.candidate_inputs] == ["ad"]
  assert [(t.name, t.shape) for t in sig.outputs] == [("score", (-1, 1))]


def test_engine_runs_each_candidate_against_its_own_request(tmp_path):
  engine = ContextEngine(export_toy(tmp_path))
  engine.warmup()
  rng = np.random.default_rng(0)
  users = rng.normal(size=(3, 3)).astype(np.float32)
  counts = [2, 1, 3]  # 6 candidates, padded to the bucket of 8
  ads = rng.normal(size=(6, 2)).astype(np.float32)
  segment = np.repeat(np.arange(3), counts).astype(np.int32)
  batch = {"user": np.concatenate([users, np.zeros((1, 3), np.float32)]),  # 4 requests
           "ad": np.concatenate([ads, np.zeros((2, 2), np.float32)]),
           SEGMENT_INPUT: np.concatenate([segment, [0, 0]]).astype(np.int32)}
  out = engine.fetch(engine.dispatch(bucket=8, inputs=batch))["score"][:6]
  user_rows = users[segment] @ PARAMS["w_user"]
  want = (user_rows * (ads @ PARAMS["w_ad"])).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  engine.close()


@pytest.mark.parametrize("change,message", [
    (dict(candidate_inputs=[]), "needs context_inputs and candidate_inputs"),
    (dict(candidate_inputs=[export.Input("user", "float32", ("batch", 2))]),
     "named more than once"),
    (dict(candidate_inputs=[export.Input("context", "float32", ("batch", 2))],
          score_fn=lambda p, ctx, context: {"s": ctx[:, :1]}), "share a name"),
    (dict(context_inputs=[export.Input("user", "int32", ("batch", "seq"))]),
     "fixed-length inputs"),
])
def test_mistakes_are_refused_with_what_to_change(tmp_path, change, message):
  kw = dict(params=PARAMS, repository=tmp_path, name="toy", context_inputs=USER,
            candidate_inputs=ADS, context_fn=context_fn, score_fn=score_fn)
  with pytest.raises(ValueError, match=message):
    export.export_context_model(apply, **{**kw, **change})
