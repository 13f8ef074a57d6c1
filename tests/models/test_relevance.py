"""Relevance cross-encoder: padding invariance; served outputs over gRPC equal the Flax model."""

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

from clientutil import assert_served_like, infer, serving
from demo.models import build_relevance
from models.relevance import RelevanceConfig, RelevanceModel
from seqserve import check_logical_axes, reference, tokens

BATCH, SEQ = (1, 4), (16, 32, 64)
SEED = 3
# bf16 params and activations (norms, softmax and the head's sigmoid in float32): on 256 random
# pairs the bf16 model's score was within 4e-3 of the float32 model's (mean 1e-3).
BF16_ATOL = 1e-2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  build_relevance(repo, tiny=True, seed=SEED, batch_buckets=BATCH, seq_buckets=SEQ)
  build_relevance(repo, tiny=True, seed=SEED, name="relevance_bf16", dtype="bfloat16",
                  batch_buckets=BATCH, seq_buckets=SEQ)
  with serving(repo) as bg:
    cfg = RelevanceConfig.tiny()
    model = RelevanceModel(cfg, rngs=nnx.Rngs(SEED))
    bf16 = RelevanceModel(cfg.with_dtype("bfloat16"), rngs=nnx.Rngs(SEED))
    yield bg, reference(model), reference(bf16), cfg


def pair(rng, rows, length, cfg):
  ids, lengths = tokens(rng, rows, length, cfg.encoder.vocab_size)
  segments = (np.arange(length)[None, :] >= rng.integers(1, length + 1, (rows, 1)))
  return {"token_ids": ids, "segment_ids": segments.astype(np.int32), "lengths": lengths}


def test_params_name_logical_axes():
  check_logical_axes(RelevanceModel(RelevanceConfig.tiny(), rngs=nnx.Rngs(0)))


def test_score_ignores_padding():
  cfg = RelevanceConfig.tiny()
  run = reference(RelevanceModel(cfg, rngs=nnx.Rngs(0)))
  x = pair(np.random.default_rng(0), 3, 10, cfg)
  padded = {k: np.pad(v, ((0, 0), (0, 22)), constant_values=7) if v.ndim == 2 else v
            for k, v in x.items()}
  np.testing.assert_allclose(run(**padded)["score"], run(**x)["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows,length", [(1, 5), (1, 16), (3, 17), (4, 32), (2, 33), (4, 64),
                                         (1, 64), (9, 40)])
def test_served_scores_equal_flax_model_across_the_grid(served, rows, length):
  bg, run, _, cfg = served
  x = pair(np.random.default_rng(rows * 100 + length), rows, length, cfg)
  with tc.InferenceServerClient(bg.address) as c:
    assert assert_served_like(c, "relevance", [x], run, rtol=1e-5, atol=1e-6) == 1
    got = infer(c, "relevance", x, ["score"])["score"]
  assert got.shape == (rows, 1) and got.dtype == np.float32


def test_bf16_bundle_within_stated_tolerance(served):
  bg, run, run_bf16, cfg = served
  x = pair(np.random.default_rng(5), 4, 40, cfg)
  with tc.InferenceServerClient(bg.address) as c:
    # The same bf16 model, then the float32 original.
    assert assert_served_like(c, "relevance_bf16", [x], run_bf16, atol=5e-3) == 1
    assert assert_served_like(c, "relevance_bf16", [x], run, atol=BF16_ATOL) == 1


def test_random_lengths_cause_zero_compiles(served):
  bg, run, _, cfg = served
  counter = bg.server.compiles
  before = counter.outside_warmup  # references above compiled in this process
  rng = np.random.default_rng(0)
  cases = [pair(rng, int(r), int(n), cfg)
           for r, n in zip(rng.integers(1, 7, 160), rng.integers(1, 65, 160))]

  def call(x):
    with tc.InferenceServerClient(bg.address) as c:
      return infer(c, "relevance", x, ["score"])["score"]

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(call, cases))
  assert counter.outside_warmup == before
  assert counter.warmup >= 2 * len(BATCH) * len(SEQ)
  runner = bg.server.repository.get("relevance").runner
  assert set(runner.seq_stats.grid_counts) <= {(b, s) for b in BATCH for s in SEQ}
  for x, got in list(zip(cases, results))[::40]:
    np.testing.assert_allclose(got, run(**x)["score"], rtol=1e-5, atol=1e-6)


def test_too_long_sequences_are_refused(served):
  bg, _, _, cfg = served
  x = pair(np.random.default_rng(1), 1, 65, cfg)
  with tc.InferenceServerClient(bg.address) as c:
    with pytest.raises(Exception, match="exceeds the model's maximum of 64"):
      infer(c, "relevance", x, ["score"])
