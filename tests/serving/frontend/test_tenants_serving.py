"""Tenants and quotas against the real server, on every path: the native gRPC fast path, the
relayed/Python path, the Python gRPC front end, HTTP (native and Python), and mTLS identities;
per-tenant metrics. Clients are unmodified tritonclient, raw gRPC stubs and raw HTTP."""

from __future__ import annotations

import json
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from clientutil import assert_served_like
from httputil import Http
from pki import Ca
from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.frontend.tenant_gate import UNKNOWN
from serving.frontend.tenants import parse_tenants
from servingutil import metric, mock_factory, mock_reference, mock_request, rpc_result, serving

NATIVE, WHY = native_frontend.load_extension()
FRONTENDS = [pytest.param("native", marks=pytest.mark.skipif(NATIVE is None, reason=WHY)),
             "python"]

TENANTS = parse_tenants({"tenants": [
    {"name": "polite", "tokens": ["tok-polite"], "priority": 1},
    {"name": "flood", "tokens": ["tok-flood"], "requests_per_s": 0.01, "requests_burst": 3},
    {"name": "rowsy", "tokens": ["tok-rowsy"], "rows_per_s": 0.01, "rows_burst": 10},
    {"name": "pair", "tokens": ["tok-pair"], "requests_per_s": 0.01, "requests_burst": 2},
    {"name": "mtls", "identities": ["scorer-a"], "requests_per_s": 0.01, "requests_burst": 2},
]})
X = np.arange(8, dtype=np.float32).reshape(2, 4)
K = np.full((2, 1), 2, np.int32)


def _md(token: str) -> tuple[tuple[str, str], ...]:
  return (("authorization", f"Bearer {token}"),)


def _metrics(bg) -> str:
  with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics") as r:
    return r.read().decode()


def _typed(x: np.ndarray, k: np.ndarray) -> pb.ModelInferRequest:
  """A request with typed contents: the native front end relays it to the Python servicer."""
  req = pb.ModelInferRequest(model_name="mock")
  t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
  t.contents.fp32_contents.extend(x.ravel().tolist())
  t = req.inputs.add(name="k", datatype="INT32", shape=list(k.shape))
  t.contents.int_contents.extend(k.ravel().tolist())
  return req


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_grpc_tenants_quotas_and_metrics(mock_repo, frontend):
  with serving(mock_repo, mock_factory(), tenants=TENANTS, frontend=frontend,
               metrics_port=0) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert stub.ServerLive(pb.ServerLiveRequest()).live  # open, as with a bearer token
    before = _relayed(bg, "relayed")
    for md in ((), _md("tok-nobody")):
      for fn, req in ((stub.ModelInfer, mock_request(X, K)),
                      (stub.ModelMetadata, pb.ModelMetadataRequest(name="mock"))):
        _, err = rpc_result(fn, req, metadata=md, timeout=10)
        assert err == (grpc.StatusCode.UNAUTHENTICATED, UNKNOWN), (fn, md)
    # Native: the ModelInfers were refused in C++ (a flood of bad credentials costs no relay);
    # only the two ModelMetadata calls reached Python. Every refusal is counted.
    assert _relayed(bg, "relayed") - before == (2 if frontend == "native" else 0)
    assert metric(_metrics(bg), "xlaserve_tenant_unknown_total") == 4
    with tc.InferenceServerClient(bg.address) as c:
      assert assert_served_like(c, "mock", [{"x": X, "k": K}] * 3, mock_reference,
                                headers={"authorization": "Bearer tok-polite"}) == 3
    relayed = _relayed(bg, "relayed")
    for _ in range(3):  # the burst of 3
      _, err = rpc_result(stub.ModelInfer, mock_request(X, K), metadata=_md("tok-flood"))
      assert err is None
    _, err = rpc_result(stub.ModelInfer, mock_request(X, K), metadata=_md("tok-flood"))
    assert err == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                   "tenant 'flood' is over its quota of 0.01 requests/s")
    assert _relayed(bg, "relayed") == relayed  # native: decided in C++, Python never saw them
    eight = mock_request(np.zeros((8, 4), np.float32), np.zeros((8, 1), np.int32))
    assert rpc_result(stub.ModelInfer, eight, metadata=_md("tok-rowsy"))[1] is None
    three = mock_request(np.zeros((3, 4), np.float32), np.zeros((3, 1), np.int32))
    _, err = rpc_result(stub.ModelInfer, three, metadata=_md("tok-rowsy"))  # 2 rows left
    assert err == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                   "tenant 'rowsy' is over its quota of 0.01 rows/s")
    # The fast path and the relayed path charge the same buckets (burst 2).
    assert rpc_result(stub.ModelInfer, mock_request(X, K), metadata=_md("tok-pair"))[1] is None
    resp, err = rpc_result(stub.ModelInfer, _typed(X, K), metadata=_md("tok-pair"))
    assert err is None and resp.model_name == "mock"
    _, err = rpc_result(stub.ModelInfer, mock_request(X, K), metadata=_md("tok-pair"))
    assert err[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "'pair'" in err[1]
    text = _metrics(bg)
    for tenant, admitted, over in (("polite", 3, 0), ("flood", 3, 1), ("rowsy", 1, 1),
                                   ("pair", 2, 1)):
      assert metric(text, "xlaserve_tenant_requests_total", tenant=tenant,
                    outcome="admitted") == admitted, tenant
      assert metric(text, "xlaserve_tenant_requests_total", tenant=tenant,
                    outcome="over_quota") == over, tenant
    if frontend == "native":
      assert bg.server.native.stats()["relayed"] >= 1


def _relayed(bg, key: str) -> int:
  """Calls the native front end relayed to Python so far (0 on the Python front end)."""
  return bg.server.native.stats()[key] if bg.server.native is not None else 0


def _http_infer(http: Http, token: str | None) -> tuple[int, bytes]:
  inputs = []
  for name, arr in (("x", X), ("k", K)):
    i = th.InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT32")
    i.set_data_from_numpy(arr, binary_data=True)
    inputs.append(i)
  outs = [th.InferRequestedOutput("y", binary_data=True)]
  body, n = th.InferenceServerClient.generate_request_body(inputs, outputs=outs)
  headers = {"Inference-Header-Content-Length": str(n),
             "Content-Type": "application/octet-stream"}
  if token is not None:
    headers["Authorization"] = f"Bearer {token}"
  status, _, reply = http.call("POST", "/v2/models/mock/infer", body, headers)
  return status, reply


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_http_tenants_get_401_and_429(mock_repo, frontend):
  with serving(mock_repo, mock_factory(), tenants=TENANTS, frontend=frontend,
               http_port=0) as bg:
    assert bg.server.http_frontend == frontend
    http = Http(bg.server.http_port)
    assert http.get("/v2/health/live")[0] == 200
    relayed = _relayed(bg, "http_relayed")
    for token in (None, "tok-nobody"):
      status, body = _http_infer(http, token)
      assert status == 401 and json.loads(body)["error"].startswith("no tenant has these credentials")
    # Native: refused in C++ (401, a Bearer challenge), not relayed; counted either way.
    assert _relayed(bg, "http_relayed") == relayed
    status, headers, _ = http.call("POST", "/v2/models/mock/infer", b"{}",
                                   {"Authorization": "Bearer tok-nobody"})
    assert status == 401 and dict(headers).get("www-authenticate") == "Bearer", headers
    for _ in range(3):
      status, body = _http_infer(http, "tok-flood")
      assert status == 200, body
      y = np.frombuffer(body[-8:], np.float32)
      np.testing.assert_array_equal(y, mock_reference(X, K)["y"].ravel())
    status, body = _http_infer(http, "tok-flood")
    assert (status, json.loads(body)) == (
        429, {"error": "tenant 'flood' is over its quota of 0.01 requests/s"})
    assert _relayed(bg, "http_relayed") == relayed  # native: answered in C++
    # JSON tensors are relayed to Python by the native server: the same buckets.
    assert _http_infer(http, "tok-pair")[0] == 200
    status, reply = http.post_json("/v2/models/mock/infer", {"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()},
        {"name": "k", "shape": [2, 1], "datatype": "INT32", "data": K.ravel().tolist()}]},
        headers={"Authorization": "Bearer tok-pair"})
    assert status == 200, reply
    assert _http_infer(http, "tok-pair")[0] == 429


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  d = tmp_path_factory.mktemp("pki")
  ca = Ca(d / "ca")
  return ca, ca.issue("localhost", server=True), ca.issue("scorer-a"), ca.issue("scorer-z")


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_mtls_identities_are_tenants(mock_repo, pki, frontend):
  ca, (cert, key), good, stranger = pki
  with serving(mock_repo, mock_factory(), tenants=TENANTS, frontend=frontend,
               tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca.cert_file) as bg:

    def client(creds):
      return tc.InferenceServerClient(bg.address, ssl=True, root_certificates=ca.cert_file,
                                      private_key=creds[1], certificate_chain=creds[0])
    with client(good) as c:
      assert c.get_model_metadata("mock").name == "mock"  # relayed: the mark names it
      assert assert_served_like(c, "mock", [{"x": X, "k": K}] * 2, mock_reference) == 2
      with pytest.raises(InferenceServerException, match="tenant 'mtls' is over its quota"):
        assert_served_like(c, "mock", [{"x": X, "k": K}], mock_reference)
      # A token names its own tenant, certificate or not.
      assert assert_served_like(c, "mock", [{"x": X, "k": K}], mock_reference,
                                headers={"authorization": "Bearer tok-polite"}) == 1
    with client(stranger) as c:  # the CA signed it, but it is no tenant's identity
      with pytest.raises(InferenceServerException, match="no tenant"):
        c.get_model_metadata("mock")
      with pytest.raises(InferenceServerException, match="no tenant"):
        assert_served_like(c, "mock", [{"x": X, "k": K}], mock_reference)
      # the mark cannot be forged through the native relay
      with pytest.raises(InferenceServerException, match="no tenant"):
        c.get_model_metadata("mock", headers={"x-xlaserve-tenant": "polite"})


def test_tenants_and_a_bearer_token_are_exclusive(mock_repo):
  from serving.server_config import ServerConfig
  with pytest.raises(ValueError, match="--tenants and --auth-token-file"):
    ServerConfig(model_repository=str(mock_repo), tenants=TENANTS, auth_token="tok")


def test_generation_is_charged_too(tmp_path):
  from httputil import both_protocols
  tenants = parse_tenants({"tenants": [{"name": "writer", "tokens": ["tok-w"],
                                        "requests_per_s": 0.01, "requests_burst": 2}]})
  with both_protocols(tmp_path / "repo", generate=True, tenants=tenants) as bg:
    api = Http(bg.server.http_port, headers={"Authorization": "Bearer tok-w"})
    status, out = api.post_json("/v2/models/lm/generate",
                                {"text_input": "ab", "parameters": {"max_tokens": 2}})
    assert (status, out["text_output"]) == (200, "cd")
    status, _, body = api.call("POST", "/v2/models/lm/generate_stream",
                               b'{"text_input": "ab", "parameters": {"max_tokens": 2}}')
    assert status == 200 and body.count(b"data: ") == 2
    status, _, body = api.call("POST", "/v2/models/lm/generate_stream",
                               b'{"text_input": "ab", "parameters": {"max_tokens": 2}}')
    assert (status, json.loads(body)) == (
        429, {"error": "tenant 'writer' is over its quota of 0.01 requests/s"})
    assert Http(bg.server.http_port).call("POST", "/v2/models/lm/generate", b"{}")[0] == 401


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_each_request_of_a_stream_is_charged(mock_repo, frontend):
  import queue

  from clientutil import triton_inputs
  results: queue.Queue = queue.Queue()
  with serving(mock_repo, mock_factory(), tenants=TENANTS, frontend=frontend) as bg, \
      tc.InferenceServerClient(bg.address) as c:
    c.start_stream(lambda result, error: results.put((result, error)),
                   headers={"authorization": "Bearer tok-pair"})  # a burst of 2
    for i in range(3):
      c.async_stream_infer("mock", triton_inputs({"x": X, "k": K}), request_id=str(i))
    got = [results.get(timeout=10) for _ in range(3)]
    c.stop_stream()
  ok = [r for r, e in got if e is None]
  errors = [e for r, e in got if e is not None]
  assert len(ok) == 2 and len(errors) == 1
  np.testing.assert_array_equal(ok[0].as_numpy("y"), mock_reference(X, K)["y"])
  assert "tenant 'pair' is over its quota of 0.01 requests/s" in errors[0].message()
