"""The retrieval -> ranking pipeline (demo/ads.py, tiny models) on the real server, called with
unmodified tritonclient. Its answer equals the steps composed without the server: numpy bytes
tokenization, the Flax query tower, a brute-force numpy top-K over the corpus embedded by the
Flax ad tower, the Flax ranker run flat on the retrieved ads, and a numpy top-n. A failing step
fails that request with the step named; the server keeps serving; ModelConfig describes the
ensemble; statistics and per-step metrics count the steps. The same pipeline with
`"handoff": "device"` (on CPU, `auto` hands over on the host) answers the same, its ranker
assembling the retrieved ads and the query embedding on the device, with no compile after its
hand-off copies warmed up.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
import urllib.error
import urllib.request

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc

import export
from flax import nnx
from tritonclient.utils import InferenceServerException

from bundle import triton_datatype
from clientutil import call_concurrently, serving, triton_inputs
from demo.ads import (TINY_ADS, TINY_K, TITLE_LEN, TOP_N, ad_corpus, build_ad_index,
                      build_ads_pipeline, pipeline_config)
from demo.models import build_ranker, build_two_tower
from models.ranking import Ranker, RankerConfig
from models.two_tower import TwoTower, TwoTowerConfig
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import metric

TOL = dict(rtol=1e-5, atol=1e-6)
QUERIES = [b"acme shoes", b"coffee offer", b"kids tent", b"warm jacket"]  # <= 16 bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  for build in (build_two_tower, build_ranker, build_ad_index, build_ads_pipeline):
    build(repo, tiny=True)
  export.export_pipeline({**pipeline_config(k=TINY_K, ranker=RankerConfig.tiny()),
                          "handoff": "device"}, repository=repo, name="ads_device", version=1)
  with serving(repo, metrics_port=0, http_port=0) as bg:
    yield bg


@pytest.fixture(scope="module")
def reference():
  """Every step without the server: the models rebuilt from their seeds, the corpus regenerated;
  `answer(cases)` for a list of (query, user) computes them all in one pass."""
  towers = TwoTower(TwoTowerConfig.tiny(), rngs=nnx.Rngs(0))
  rcfg = RankerConfig.tiny()
  ranker = Ranker(dataclasses.replace(rcfg, query_dim=TwoTowerConfig.tiny().embed_dim),
                  rngs=nnx.Rngs(0))
  corpus = ad_corpus(TINY_ADS, 0, table_sizes=rcfg.ad_table_sizes, dense=rcfg.ad_dense)
  ads = np.asarray(towers.ad(*map(jnp.asarray, byte_ids(corpus["titles"], TITLE_LEN))))  # all at once

  def answer(cases):
    q = np.asarray(towers.query(*map(jnp.asarray, byte_ids([c[0] for c in cases], 16))))
    out = []
    for (query, u), qi in zip(cases, q):
      sims = (ads @ qi).astype(np.float64)
      order = np.argsort(-sims, kind="stable")
      assert sims[order[TINY_K - 1]] - sims[order[TINY_K]] > 1e-4, "near tie at K: change data"
      out.append((order[:TINY_K], qi, u))
    rows = {"history": [], "user_dense": [], "query": [], "ad_sparse": [], "ad_dense": []}
    for top, qi, u in out:  # the flat ranker on every case's K ads, user rows repeated
      rows["history"].append(np.repeat(u["history"], TINY_K, 0))
      rows["user_dense"].append(np.repeat(u["user_dense"], TINY_K, 0))
      rows["query"].append(np.repeat(qi[None], TINY_K, 0))
      rows["ad_sparse"].append(corpus["ad_sparse"][top])
      rows["ad_dense"].append(corpus["ad_dense"][top])
    prob = np.asarray(ranker(**{k: jnp.asarray(np.concatenate(v)) for k, v in rows.items()})
                      ["prob"]).reshape(len(cases), TINY_K)
    best = [np.argsort(-p, kind="stable")[:TOP_N] for p in prob]
    return [(corpus["ad_ids"][top][b], p[b]) for (top, _, _), p, b in zip(out, prob, best)]
  return answer


def byte_ids(texts, length: int) -> tuple[np.ndarray, np.ndarray]:
  """UTF-8 bytes as token ids [n, length] (0-padded) and lengths [n], written out here."""
  texts = [t[:length] for t in texts]
  ids = np.zeros((len(texts), length), np.int32)
  for i, t in enumerate(texts):
    ids[i, :len(t)] = list(t)
  return ids, np.array([len(t) for t in texts], np.int32)


def user(rng: np.random.Generator) -> dict[str, np.ndarray]:
  cfg = RankerConfig.tiny()
  return {"history": rng.integers(-1, cfg.history_rows, (1, cfg.history_len)).astype(np.int32),
          "user_dense": rng.normal(size=(1, cfg.user_dense)).astype(np.float32)}


def call(client: tc.InferenceServerClient, query: bytes, u: dict[str, np.ndarray],
         model: str = "ads_pipeline"):
  res = client.infer(model, triton_inputs(
      {"query": np.array([query], dtype=object), **u}), client_timeout=60)
  return res.as_numpy("ad_ids"), res.as_numpy("scores")


def _native(bg, path: str) -> int:
  """Pipeline calls the native front end answered through its fast path or relayed."""
  return bg.server.native.stats()[path] if bg.server.native is not None else 0


def test_one_call_equals_the_steps_composed_without_the_server(served, reference):
  rng = np.random.default_rng(0)
  cases = [(q, user(rng)) for q in QUERIES]
  fast = _native(served, "fast")
  answers = call_concurrently(served.address, call, cases, workers=len(cases))
  if served.server.native is not None:  # the query text (BYTES) no longer sends it to Python
    assert _native(served, "fast") - fast == len(cases)
  for (q, u), (ids, scores), (want_ids, want_scores) in zip(cases, answers, reference(cases)):
    assert ids.shape == (1, TOP_N) and scores.shape == (1, TOP_N)
    np.testing.assert_array_equal(ids[0], want_ids, err_msg=q)
    np.testing.assert_allclose(scores[0], want_scores, **TOL, err_msg=q)


def handoffs(bg, step: str, name: str, where: str) -> float:
  return metric(bg.server.metrics.exposition().decode(), "xlaserve_pipeline_handoffs_total",
                model="ads_device", step=step, input=name, where=where)


RANK_EDGES = ("query", "ad_sparse", "ad_dense")  # the ranker's inputs from earlier model steps


def test_device_handoff_equals_the_steps_composed_and_compiles_nothing(served, reference):
  rng = np.random.default_rng(2)
  cases = [(q, user(rng)) for q in QUERIES * 2]
  want = reference(cases)  # first: the Flax models' own compiles count in this process
  with tc.InferenceServerClient(served.address) as c:  # until its copies compiled: via the host
    end = time.monotonic() + 120
    while not all(handoffs(served, "rank", n, "device") for n in RANK_EDGES):
      assert time.monotonic() < end, "the device hand-off never warmed up"
      call(c, QUERIES[0], cases[0][1], "ads_device")
      time.sleep(0.2)
  text = served.server.metrics.exposition().decode()
  compiles = metric(text, "xlaserve_compiles_after_warmup")
  before = {(n, w): handoffs(served, "rank", n, w) for n in RANK_EDGES for w in ("device", "host")}
  answers = call_concurrently(served.address, lambda c, q, u: call(c, q, u, "ads_device"), cases,
                              workers=4)
  for (q, _), (ids, scores), (want_ids, want_scores) in zip(cases, answers, want):
    np.testing.assert_array_equal(ids[0], want_ids, err_msg=q)
    np.testing.assert_allclose(scores[0], want_scores, **TOL, err_msg=q)
  for n in RANK_EDGES:  # every request's ranker inputs were assembled on the device, once per
    # batch its candidates ran in (two or more: the tiny ranker's largest bucket is 16 of 20)
    assert handoffs(served, "rank", n, "device") - before[n, "device"] >= 2 * len(cases)
    assert handoffs(served, "rank", n, "host") == before[n, "host"]
  assert metric(served.server.metrics.exposition().decode(),
                "xlaserve_compiles_after_warmup") == compiles


def test_a_failing_step_fails_that_request_with_the_step_named(served, reference):
  rng = np.random.default_rng(1)
  u = user(rng)
  with tc.InferenceServerClient(served.address) as c:
    # 40 bytes: longer than the tiny query tower's largest sequence bucket (16).
    with pytest.raises(InferenceServerException) as e:
      call(c, b"a query much longer than sixteen bytes!!", u)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "pipeline ads_pipeline step 'embed' (model two_tower_query)" in e.value.message()
    c.unload_model("ranker")
    with pytest.raises(InferenceServerException) as e:
      call(c, QUERIES[0], u)
    assert e.value.status() == "StatusCode.UNAVAILABLE"
    assert "step 'rank' (model ranker)" in e.value.message()
    c.load_model("ranker")
    ids, scores = call(c, QUERIES[0], u)
    np.testing.assert_array_equal(ids[0], reference([(QUERIES[0], u)])[0][0])
    with pytest.raises(InferenceServerException) as e:  # the protocol's own checks come first
      call(c, QUERIES[0], {**u, "user_dense": np.zeros((2, 3), np.float32)})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "'user_dense'" in e.value.message()
  relayed, req = _native(served, "relayed"), pb.ModelInferRequest(model_name="ads_pipeline")
  for name, arr in (("query", None), *u.items()):
    req.inputs.add(name=name, datatype="BYTES" if arr is None else triton_datatype(arr.dtype),
                   shape=[1] if arr is None else arr.shape)
    req.raw_input_contents.append((100).to_bytes(4, "little") + b"short" if arr is None
                                  else arr.tobytes())  # a BYTES length running past the data
  with grpc.insecure_channel(served.address) as ch:
    with pytest.raises(grpc.RpcError) as e:  # the Python codec's message, as ever
      pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
  assert "BYTES element of 100 bytes runs past the data" in e.value.details()
  assert served.server.native is None or _native(served, "relayed") == relayed + 1


def test_config_statistics_and_step_metrics(served):
  with tc.InferenceServerClient(served.address) as c:
    config = c.get_model_config("ads_pipeline", as_json=True)["config"]
    stats = c.get_inference_statistics("ads_pipeline", as_json=True)["model_stats"][0]
  assert config["platform"] == "ensemble"
  steps = config["ensemble_scheduling"]["step"]
  assert [s["model_name"] for s in steps] == ["two_tower_query", "ad_index", "ranker"]
  assert steps[1]["input_map"] == {"query": "embed.embedding"}
  assert config["parameters"]["pipeline_ops"]["string_value"] == "tokenize:tokenize,select:top_k"
  ok = int(stats["inference_stats"]["success"]["count"])
  assert ok >= len(QUERIES)
  text = urllib.request.urlopen(
      f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=30).read().decode()
  line = next(x for x in text.splitlines() if x.startswith("xlaserve_pipeline_step_seconds_count")
              and 'model="ads_pipeline"' in x and 'step="rank"' in x)
  assert float(line.split()[-1]) >= ok


def index_query(client: tc.InferenceServerClient, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  res = client.infer("ad_index", triton_inputs({"query": q}), client_timeout=60)
  return res.as_numpy("ad_ids")[0], res.as_numpy("scores")[0]


def update(port: int, model: str, rows, **leaves: np.ndarray) -> dict:
  """POST /v2/models/<model>/params with JSON tensors; the JSON answer (raises HTTPError)."""
  kinds = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32"}
  body = {"inputs": [{"name": "rows", "datatype": "INT64", "shape": [len(rows)],
                      "data": [int(r) for r in rows]}] + [
      {"name": k, "datatype": kinds[v.dtype], "shape": list(v.shape), "data": v.ravel().tolist()}
      for k, v in leaves.items()]}
  req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{model}/params",
                               data=json.dumps(body).encode(), method="POST")
  return json.loads(urllib.request.urlopen(req, timeout=60).read())


def test_ads_are_added_removed_and_replaced_live_one_generation_per_query(served):
  port = served.server.http_port
  with tc.InferenceServerClient(served.address) as c:
    ids, lengths = byte_ids([QUERIES[0]], 16)
    q = c.infer("two_tower_query", triton_inputs({"token_ids": ids, "lengths": lengths})
                ).as_numpy("embedding")
    before = index_query(c, q)
    slot = TINY_ADS  # the first free slot
    added = update(port, "ad_index", [slot], embeddings=q, ad_ids=np.array([777777], np.int32),
                   valid=np.ones(1, np.float32))
    got_ids, got_scores = index_query(c, q)
    assert got_ids[0] == 777777 and abs(got_scores[0] - float(q[0] @ q[0])) < 1e-5
    removed = update(port, "ad_index", [slot], valid=np.zeros(1, np.float32))
    assert removed["generation"] == added["generation"] + 1
    after = index_query(c, q)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], rtol=1e-6)

    # Replace every ad: the same ads in other slots (embeddings and ids moved together). A query
    # answered with half the update (embeddings moved, ids not) would name other ads.
    perm = np.random.default_rng(0).permutation(TINY_ADS)
    rcfg = RankerConfig.tiny()
    corpus = ad_corpus(TINY_ADS, 0, table_sizes=rcfg.ad_table_sizes, dense=rcfg.ad_dense)
    towers = TwoTower(TwoTowerConfig.tiny(), rngs=nnx.Rngs(0))
    emb = np.asarray(towers.ad(*map(jnp.asarray, byte_ids(corpus["titles"], TITLE_LEN))))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      queries = [pool.submit(index_query, c, q) for _ in range(40)]
      moved = update(port, "ad_index", perm, embeddings=emb, ad_ids=corpus["ad_ids"],
                     ad_sparse=corpus["ad_sparse"], ad_dense=corpus["ad_dense"])
      answers = [f.result() for f in queries]
    assert moved["rows"] == TINY_ADS and moved["generation"] == removed["generation"] + 1
    for got_ids, got_scores in answers + [index_query(c, q)]:
      np.testing.assert_array_equal(got_ids, before[0])
      np.testing.assert_allclose(got_scores, before[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model,rows,leaves,message", [
    ("ad_index", [0], {"nope": np.zeros((1, 2), np.float32)}, "has no param leaves ['nope']"),
    ("ad_index", [10**6], {"valid": np.zeros(1, np.float32)}, "rows must be in [0, 2200)"),
    ("ad_index", [0], {"valid": np.zeros(2, np.float32)}, "has 2 rows but another input has 1"),
    ("ads_pipeline", [0], {"valid": np.zeros(1, np.float32)}, "no params that can be updated"),
])
def test_bad_updates_are_refused_by_name(served, model, rows, leaves, message):
  with pytest.raises(urllib.error.HTTPError) as e:
    update(served.server.http_port, model, rows, **leaves)
  assert e.value.code == 400
  assert message in json.loads(e.value.read())["error"]
