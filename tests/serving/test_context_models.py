"""Context models on the real server: one user row per request, N candidate rows, exported in two
parts (models/ranking.py through export.export_context_model). Every answer equals the Flax
model run flat, on the user's rows repeated N times, computed outside any bundle or server; the
requests share batches (a long queue delay, no dispatch when idle), cross candidate buckets and
are split across batches (more candidates than the largest bucket); no compile after warm-up;
bad shapes get INVALID_ARGUMENT / 400 naming the input, and the server keeps serving.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from flax import nnx
from tritonclient.utils import InferenceServerException

from clientutil import call_concurrently, infer, serving, triton_inputs
from demo.models import build_ranker
from models.ranking import Ranker, RankerConfig

BUCKETS = (1, 4, 16)  # candidates per batch
REQUEST_BUCKETS = (1, 2, 4)  # requests per batch
TOL = dict(rtol=1e-5, atol=1e-6)  # float32: batching changes XLA's reduction order only


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  build_ranker(repo, tiny=True, seed=5, query_dim=0, batch_buckets=BUCKETS,
               request_buckets=REQUEST_BUCKETS)
  (repo / "ranker" / "config.json").write_text(json.dumps(
      {"max_queue_delay_us": 300_000, "dispatch_when_idle": False}))
  with serving(repo, http_port=0) as bg:
    yield bg, Ranker(RankerConfig.tiny(), rngs=nnx.Rngs(5))


def request(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  """One user (history with -1 padding and ids past the table, profile) and n candidates."""
  cfg = RankerConfig.tiny()
  history = rng.integers(-1, 2 * cfg.history_rows, (1, cfg.history_len)).astype(np.int32)
  history[0, rng.integers(1, cfg.history_len):] = -1
  return {"history": history,
          "user_dense": rng.normal(size=(1, cfg.user_dense)).astype(np.float32),
          "ad_sparse": rng.integers(-1, 1000, (n, len(cfg.ad_table_sizes))).astype(np.int32),
          "ad_dense": rng.normal(size=(n, cfg.ad_dense)).astype(np.float32)}


def flat_reference(model: Ranker, case: dict[str, np.ndarray]) -> np.ndarray:
  """The flat model on the user's rows repeated for every candidate (rows already repeated are
  taken as they are)."""
  n = len(case["ad_sparse"])
  case = {k: v if len(v) == n else np.repeat(v, n, 0) for k, v in case.items()}
  out = model(**{k: jnp.asarray(v) for k, v in case.items()})
  return np.asarray(out["prob"])


def _call(client: tc.InferenceServerClient, case: dict[str, np.ndarray]) -> np.ndarray:
  return infer(client, "ranker", case, ["prob"], client_timeout=60)["prob"]


def test_answers_equal_the_flat_model_across_buckets_and_splits(served):
  bg, model = served
  rng = np.random.default_rng(0)
  # Sizes at and across bucket edges, one larger than the largest bucket (split), many small
  # ones (more requests than the largest request bucket queue at once).
  sizes = [1, 3, 4, 5, 16, 17, 40, 2, 1, 1, 1, 1, 2, 1]
  cases = [request(rng, n) for n in sizes]
  with tc.InferenceServerClient(bg.address) as c:
    before = c.get_inference_statistics("ranker", as_json=True)["model_stats"][0]
  compiles = bg.server.compiles.outside_warmup
  answers = call_concurrently(bg.address, _call, [(case,) for case in cases], workers=len(cases))
  assert bg.server.compiles.outside_warmup == compiles  # read before the references compile
  # The flat model is row-wise: one call on every request's rows, in order, is the reference.
  want = flat_reference(model, {k: np.concatenate([
      np.repeat(c[k], n, 0) if k in ("history", "user_dense") else c[k]
      for n, c in zip(sizes, cases)]) for k in cases[0]})
  ends = np.cumsum(sizes)
  for n, end, got in zip(sizes, ends, answers):
    assert got.shape == (n, 1)
    np.testing.assert_allclose(got, want[end - n:end], **TOL, err_msg=f"{n} rows")
  with tc.InferenceServerClient(bg.address) as c:
    stats = c.get_inference_statistics("ranker", as_json=True)["model_stats"][0]
  batches = int(stats.get("execution_count", 0)) - int(before.get("execution_count", 0))
  rows = int(stats["inference_count"]) - int(before.get("inference_count", 0))
  assert rows == sum(sizes)  # candidates are the rows counted
  assert batches < len(cases)  # requests shared batches


def test_http_binary_and_json_match_grpc(served):
  bg, model = served
  case = request(np.random.default_rng(1), 23)
  want = flat_reference(model, case)
  with th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}") as c:
    for binary in (True, False):
      ins = []
      for name, arr in case.items():
        i = th.InferInput(name, list(arr.shape), "INT32" if arr.dtype == np.int32 else "FP32")
        i.set_data_from_numpy(arr, binary_data=binary)
        ins.append(i)
      got = c.infer("ranker", ins, outputs=[th.InferRequestedOutput("prob", binary_data=binary)])
      np.testing.assert_allclose(got.as_numpy("prob"), want, **TOL)


def test_metadata_and_config_say_which_inputs_are_per_request(served):
  bg, _ = served
  cfg = RankerConfig.tiny()
  with tc.InferenceServerClient(bg.address) as c:
    meta = c.get_model_metadata("ranker", as_json=True)
    config = c.get_model_config("ranker", as_json=True)["config"]
  shapes = {t["name"]: [int(d) for d in t["shape"]] for t in meta["inputs"]}
  assert shapes == {"history": [1, cfg.history_len], "user_dense": [1, cfg.user_dense],
                    "ad_sparse": [-1, len(cfg.ad_table_sizes)], "ad_dense": [-1, cfg.ad_dense]}
  params = {k: v["string_value"] for k, v in config["parameters"].items()}
  assert params["context_inputs"] == "history,user_dense"
  assert params["candidate_inputs"] == "ad_sparse,ad_dense"
  assert params["max_batch_requests"] == str(REQUEST_BUCKETS[-1])


def test_bad_shapes_are_refused_by_name_and_the_server_keeps_serving(served):
  bg, model = served
  rng = np.random.default_rng(2)
  two_users = request(rng, 3)
  two_users["history"] = np.repeat(two_users["history"], 2, 0)
  uneven = request(rng, 3)
  uneven["ad_dense"] = uneven["ad_dense"][:2]
  with tc.InferenceServerClient(bg.address) as c:
    with pytest.raises(InferenceServerException) as e:
      c.infer("ranker", triton_inputs(two_users))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'history' is a context input: one row per request" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
      c.infer("ranker", triton_inputs(uneven))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'ad_dense' has 2 rows but another input has 3" in e.value.message()
    ok = request(rng, 6)
    np.testing.assert_allclose(_call(c, ok), flat_reference(model, ok), **TOL)
  with th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}") as c:
    ins = []
    for name, arr in two_users.items():
      i = th.InferInput(name, list(arr.shape), "INT32" if arr.dtype == np.int32 else "FP32")
      i.set_data_from_numpy(arr)
      ins.append(i)
    with pytest.raises(InferenceServerException) as e:
      c.infer("ranker", ins)
    assert e.value.status() == "400" and "context input" in e.value.message()
