"""Two-tower retrieval: one bundle, two served models (one per tower), unit-norm embeddings."""

import concurrent.futures

import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

from clientutil import assert_served_like, infer, serving
from demo.models import build_two_tower
from models.two_tower import TwoTower, TwoTowerConfig
from seqserve import check_logical_axes, reference, tokens

BATCH, QUERY_SEQ, AD_SEQ = (1, 4), (8, 16), (16, 32)
SEED = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  build_two_tower(repo, tiny=True, seed=SEED, batch_buckets=BATCH, query_seq_buckets=QUERY_SEQ,
                  ad_seq_buckets=AD_SEQ)
  with serving(repo) as bg:
    cfg = TwoTowerConfig.tiny()
    model = TwoTower(cfg, rngs=nnx.Rngs(SEED))
    refs = {"two_tower_query": reference(model, "query_embedding"),
            "two_tower_ad": reference(model, "ad_embedding")}
    yield bg, refs, cfg


def test_params_name_logical_axes():
  check_logical_axes(TwoTower(TwoTowerConfig.tiny(), rngs=nnx.Rngs(0)))


def test_each_signature_is_its_own_model(served):
  bg, _, _ = served
  with tc.InferenceServerClient(bg.address) as c:
    index = [(m.name, m.state) for m in c.get_model_repository_index().models]
    assert index == [("two_tower_ad", "READY"), ("two_tower_query", "READY")]
    assert not c.is_model_ready("two_tower")
    for name in ("two_tower_query", "two_tower_ad"):
      md = c.get_model_metadata(name)
      assert [(t.name, list(t.shape)) for t in md.inputs] == [("token_ids", [-1, -1]),
                                                             ("lengths", [-1])]
      assert [(t.name, list(t.shape)) for t in md.outputs] == [("embedding", [-1, 16])]
  rec = bg.server.repository.get("two_tower_query")
  assert rec.runner.seq_buckets == QUERY_SEQ
  assert bg.server.repository.get("two_tower_ad").runner.seq_buckets == AD_SEQ


@pytest.mark.parametrize("model", ["two_tower_query", "two_tower_ad"])
@pytest.mark.parametrize("rows,length", [(1, 3), (3, 8), (4, 9), (2, 16), (6, 13)])
def test_served_embeddings_are_unit_norm_and_equal_flax(served, model, rows, length):
  bg, refs, cfg = served
  ids, lengths = tokens(np.random.default_rng(rows * 31 + length), rows, length,
                        cfg.query.vocab_size)
  x = {"token_ids": ids, "lengths": lengths}
  with tc.InferenceServerClient(bg.address) as c:
    assert assert_served_like(c, model, [x], refs[model], rtol=1e-5, atol=1e-6) == 1
    got = infer(c, model, x, ["embedding"])["embedding"]
  assert got.shape == (rows, cfg.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_the_towers_differ_and_keep_their_own_length_limits(served):
  bg, _, cfg = served
  ids, lengths = tokens(np.random.default_rng(0), 2, 12, cfg.query.vocab_size)
  x = {"token_ids": ids, "lengths": lengths}
  with tc.InferenceServerClient(bg.address) as c:
    q = infer(c, "two_tower_query", x, ["embedding"])["embedding"]
    a = infer(c, "two_tower_ad", x, ["embedding"])["embedding"]
    assert np.abs(q - a).max() > 0.1  # separate weights
    long_ids, long_lengths = tokens(np.random.default_rng(1), 1, 30, cfg.ad.vocab_size)
    y = {"token_ids": long_ids, "lengths": long_lengths}
    assert infer(c, "two_tower_ad", y, ["embedding"])["embedding"].shape == (1, cfg.embed_dim)
    with pytest.raises(Exception, match="exceeds the model's maximum of 16"):
      infer(c, "two_tower_query", y, ["embedding"])


def test_random_lengths_cause_zero_compiles(served):
  bg, refs, cfg = served
  counter = bg.server.compiles
  before = counter.outside_warmup
  rng = np.random.default_rng(7)
  cases = []
  for i in range(160):
    model = "two_tower_query" if i % 2 else "two_tower_ad"
    limit = (QUERY_SEQ if i % 2 else AD_SEQ)[-1]
    ids, lengths = tokens(rng, int(rng.integers(1, 7)), int(rng.integers(1, limit + 1)),
                          cfg.query.vocab_size)
    cases.append((model, {"token_ids": ids, "lengths": lengths}))

  def call(case):
    with tc.InferenceServerClient(bg.address) as c:
      return infer(c, case[0], case[1], ["embedding"])["embedding"]

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(call, cases))
  assert counter.outside_warmup == before
  for (model, x), got in list(zip(cases, results))[::40]:
    np.testing.assert_allclose(got, refs[model](**x)["embedding"], rtol=1e-5, atol=1e-6)
