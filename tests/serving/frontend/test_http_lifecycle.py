"""HTTP under the bearer token and TLS (as gRPC), and readiness through start-up and shutdown:
not ready while models load or once shutdown begins, accepted requests answered, new ones 503
with gRPC's UNAVAILABLE message."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import ssl
import threading
import time
import urllib.request

import gevent.ssl
import grpc
import numpy as np
import pytest
import tritonclient.http as th

from httputil import Http, both_protocols
from serving.engines.mock import MockEngine
from serving.server import BackgroundServer, Server, ServerConfig
from servingutil import expected, mock_request, mock_rows, wait_until, write_mock_bundle

TOKEN = "s3cr3t-Token_42"


def http_inputs(x: np.ndarray, k: np.ndarray) -> list[th.InferInput]:
  out = []
  for name, arr in (("x", x), ("k", k)):
    i = th.InferInput(name, list(arr.shape), th.np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr)
    out.append(i)
  return out


def test_bearer_token_guards_every_endpoint_but_liveness_and_readiness(tmp_path):
  x, k = mock_rows(np.random.default_rng(0), 2)
  with both_protocols(tmp_path / "repo", auth_token=TOKEN) as bg:
    api = Http(bg.server.http_port)
    body = json.dumps({"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
        {"name": "k", "shape": [2, 1], "datatype": "INT32", "data": k.ravel().tolist()}]}).encode()
    guarded = [("GET", "/v2"), ("GET", "/v2/models/mock"), ("GET", "/v2/models/mock/ready"),
               ("GET", "/v2/models/mock/config"), ("GET", "/v2/models/stats"),
               ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/mock/unload"),
               ("POST", "/v2/models/mock/infer"), ("POST", "/v2/models/mock/generate")]
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
      for method, path in guarded:
        status, headers, answer = api.call(method, path, body if method == "POST" else None,
                                           header)
        assert status == 401, (path, header)
        assert "Authorization: Bearer <token>" in json.loads(answer)["error"]
        assert headers["www-authenticate"] == "Bearer"
    for path in ("/v2/health/live", "/v2/health/ready"):  # open, as gRPC's ServerLive/Ready
      assert api.get(path)[0] == 200
    with th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}") as c:
      auth = {"Authorization": f"Bearer {TOKEN}"}
      assert c.is_model_ready("mock", headers=auth)
      stats = c.get_inference_statistics("mock", headers=auth)["model_stats"][0]
      assert stats["inference_count"] == 0  # no refused request reached the model
      res = c.infer("mock", http_inputs(x, k), headers=auth)
      np.testing.assert_array_equal(res.as_numpy("y"), expected(x, k)[0])
      with pytest.raises(th.InferenceServerException) as e:
        c.infer("mock", http_inputs(x, k))
      assert e.value.status() == "401"


def test_tls_serves_https_only(tmp_path, cert_files):
  cert, key = cert_files
  x, k = mock_rows(np.random.default_rng(1), 3)
  with both_protocols(tmp_path / "repo", tls_cert_file=cert, tls_key_file=key,
                      auth_token=TOKEN) as bg:
    port = bg.server.http_port
    factory = functools.partial(gevent.ssl.create_default_context, cafile=cert)
    with th.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                  ssl_context_factory=factory) as c:
      res = c.infer("mock", http_inputs(x, k), headers={"Authorization": f"Bearer {TOKEN}"})
      np.testing.assert_array_equal(res.as_numpy("z"), expected(x, k)[1])
    ctx = ssl.create_default_context(cafile=cert)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/health/ready", context=ctx,
                                timeout=10) as r:
      assert r.status == 200
    with pytest.raises(Exception):  # plaintext against the TLS port
      urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).read()


def test_not_ready_while_models_load(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  gate = threading.Event()

  def slow_factory(path, manifest, cfg):
    gate.wait(30)
    return MockEngine(buckets=manifest.batch_buckets)

  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0,
                                            http_port=0, metrics_port=-1),
                               engine_factory=slow_factory))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    started = pool.submit(bg.start)
    try:
      assert wait_until(lambda: bg.server.http_port is not None, 30)
      api = Http(bg.server.http_port)
      assert api.get("/v2/health/live")[0] == 200
      assert api.get("/v2/health/ready")[0] == 400
      assert api.get("/v2/models/mock/ready")[0] == 400
    finally:
      gate.set()
      started.result(60)
  try:
    assert api.get("/v2/health/ready")[0] == 200
    assert api.get("/v2/models/mock/ready")[0] == 200
  finally:
    bg.stop()


def test_shutdown_answers_accepted_requests_then_refuses_like_grpc(tmp_path):
  x, k = mock_rows(np.random.default_rng(2), 2)
  with both_protocols(tmp_path / "repo", engine_kwargs={"delay_s": 1.0}) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    port = bg.server.http_port
    api = Http(port)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      with th.InferenceServerClient(f"127.0.0.1:{port}") as c:
        in_flight = pool.submit(c.infer, "mock", http_inputs(x, k))
        time.sleep(0.2)  # accepted and running
        bg.server.request_stop()
        assert wait_until(lambda: api.get("/v2/health/ready")[0] == 400, 5)
        assert api.get("/v2/health/live")[0] == 200
        body = json.dumps({"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "k", "shape": [2, 1], "datatype": "INT32",
             "data": k.ravel().tolist()}]}).encode()
        status, _, answer = api.call("POST", "/v2/models/mock/infer", body)
        with pytest.raises(grpc.RpcError) as e:
          stub.ModelInfer(mock_request(x, k))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (status, json.loads(answer)) == (503, {"error": e.value.details()})
        np.testing.assert_array_equal(in_flight.result(30).as_numpy("y"), expected(x, k)[0])
  with pytest.raises(OSError):  # stopped: the port is closed
    api.get("/v2/health/live")
