"""64-bit integer inputs on a server whose JAX runs 32-bit integers (x64 off, the default): a
model exported with int64 ids takes them as int32, so an id past 2^31 would wrap and silently
score another row. The server answers such a request INVALID_ARGUMENT (HTTP 400) with the
engine's own message (serving/engines/base.py check_fits), at admission, while the requests sent
with it are answered exactly (numpy reference), through both the native gRPC and HTTP front ends
with their batch queue and the Python ones (ModelRunner)."""

from __future__ import annotations

import http.client
import json

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx
from tritonclient.utils import InferenceServerException

import export
from clientutil import call_concurrently, serving, triton_inputs
from servingutil import metric
from serving.engines.base import check_fits

ROWS = 1000  # the model reads ids modulo this, as embedding lookups do


class IdModel(nnx.Module):
  """y = (ids mod ROWS) * w + x: depends on every id bit that matters."""

  def __init__(self):
    self.w = nnx.Param(jnp.full((3,), 0.5, jnp.float32))

  def __call__(self, ids, x):
    return {"y": (ids % ROWS).astype(jnp.float32) * self.w[...] + x}


def reference(ids: np.ndarray, x: np.ndarray) -> np.ndarray:
  return (ids % ROWS).astype(np.float32) * 0.5 + x


@pytest.fixture(scope="module", params=[("auto", "native"), ("python", "python")],
                ids=["native-queue", "python-batcher"])
def served(request, tmp_path_factory):
  repo = tmp_path_factory.mktemp("int64")
  export.export_model(IdModel(), repository=repo, name="ids", version=1,
                      inputs=[export.Input("ids", "int64", ("batch", 3)),
                              export.Input("x", "float32", ("batch", 3))],
                      config=export.ExportConfig(batch_buckets=(1, 4, 16),
                                                 max_queue_delay_us=20_000))
  frontend, queue = request.param
  with serving(repo, frontend=frontend, batch_queue=queue, http_port=0,
               http_frontend=frontend) as bg:
    yield bg


def engine_message(ids: np.ndarray) -> str:
  """What the engine says of these ids (the message the server answers with)."""
  with pytest.raises(Exception) as refused:
    check_fits("ids", ids, np.int32)
  return refused.value.message


def call(client: tc.InferenceServerClient, ids: np.ndarray, x: np.ndarray):
  try:
    return client.infer("ids", triton_inputs({"ids": ids, "x": x}),
                        client_timeout=60).as_numpy("y")
  except InferenceServerException as e:
    return e


def test_an_id_past_int32_is_refused_by_name_and_its_batch_mates_are_served(served):
  rng = np.random.default_rng(0)
  cases = []
  for i in range(12):
    ids = rng.integers(-2**31, 2**31, (int(rng.integers(1, 4)), 3), dtype=np.int64)
    if i % 4 == 1:
      ids[-1, 1] = 2**31 + 5 * i  # one bad id: would wrap to a negative one
    if i % 4 == 3:
      ids[0, 0] = -2**31 - 1
    cases.append((ids, rng.normal(size=ids.shape).astype(np.float32)))
  answers = call_concurrently(served.address, call, cases, workers=12)
  for (ids, x), got in zip(cases, answers):
    bad = ids.max() > 2**31 - 1 or ids.min() < -2**31
    if bad:
      assert isinstance(got, InferenceServerException), ids
      assert got.status() == "StatusCode.INVALID_ARGUMENT"
      assert got.message() == engine_message(ids)
    else:
      assert not isinstance(got, InferenceServerException), (got.status(), got.message())
      np.testing.assert_allclose(got, reference(ids, x), rtol=1e-6)


def test_over_http_an_id_past_int32_is_a_400_with_the_same_message(served):
  rng = np.random.default_rng(1)
  for bad in (2**31, -2**31 - 7, 2**62):
    ids = rng.integers(0, 2**31, (2, 3), dtype=np.int64)
    ids[1, 2] = bad
    x = rng.normal(size=(2, 3)).astype(np.float32)
    body = json.dumps({"inputs": [
        {"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": ids.ravel().tolist()},
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=60)
    try:
      conn.request("POST", "/v2/models/ids/infer", body=body,
                   headers={"Content-Type": "application/json"})
      resp = conn.getresponse()
      status, answer = resp.status, json.loads(resp.read())
    finally:
      conn.close()
    assert status == 400 and answer == {"error": engine_message(ids)}, (status, answer)


def test_a_refused_id_is_counted_by_the_next_scrape(served):
  """A refusal answered at admission is in the very next metrics scrape (the native queue
  answers it at once, from the gRPC thread, before the runner has seen it)."""
  def refused() -> float:
    text = served.server.metrics.exposition().decode()  # a scrape, as the metrics port serves it
    return metric(text, "nv_inference_request_failure", model="ids", version="1",
                  reason="INVALID_ARGUMENT")

  rng = np.random.default_rng(2)
  for _ in range(3):
    before = refused()
    ids = rng.integers(0, 2**31, (2, 3), dtype=np.int64)
    ids[0, 0] = 2**33
    with tc.InferenceServerClient(served.address) as client:
      got = call(client, ids, rng.normal(size=(2, 3)).astype(np.float32))
    assert isinstance(got, InferenceServerException), got
    assert refused() == before + 1
