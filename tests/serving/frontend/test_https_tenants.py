"""Client certificates name tenants over HTTPS too, against the real server: the native HTTP
front end maps a verified certificate's CN or SANs to a tenant (the gRPC port's rule) on its
fast path and passes it to Python on everything it relays, in a mark a client cannot forge;
uvicorn (`--http-frontend python`) exposes no certificate to the app, so there only tokens
count. Clients: unmodified tritonclient.http and http.client with the certificate."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.request

import gevent.ssl
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from pki import Ca
from serving.frontend import native as native_frontend
from serving.frontend.tenants import parse_tenants
from servingutil import metric, mock_factory, mock_reference, serving

NATIVE, WHY = native_frontend.load_extension()
X = np.arange(8, dtype=np.float32).reshape(2, 4)
K = np.full((2, 1), 2, np.int32)
TENANTS = parse_tenants({"tenants": [
    {"name": "by-cn", "identities": ["scorer-a"], "requests_per_s": 0.01, "requests_burst": 3},
    {"name": "by-san", "identities": ["spiffe://ads/batch"], "requests_per_s": 0.01,
     "requests_burst": 3},
    {"name": "polite", "tokens": ["tok-polite"]},
]})
JSON_INFER = json.dumps({"inputs": [
    {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()},
    {"name": "k", "shape": [2, 1], "datatype": "INT32", "data": K.ravel().tolist()}]}).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  ca = Ca(tmp_path_factory.mktemp("pki") / "ca")
  return {"ca": ca, "server": ca.issue("localhost", server=True),
          "cn": ca.issue("scorer-a"),  # tenant by-cn by its subject CN
          "san": ca.issue("batch-host-7", sans=("batch.internal", "spiffe://ads/batch")),
          "stranger": ca.issue("scorer-z", sans=("spiffe://ads/other",))}


def _call(port: int, pki: dict, who: str, method: str, path: str, body=b"",
          headers: dict | None = None) -> tuple[int, dict]:
  """(status, JSON body) over HTTPS with the client certificate `who`."""
  ctx = ssl.create_default_context(cafile=pki["ca"].cert_file)
  ctx.load_cert_chain(*pki[who])
  conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")
  finally:
    conn.close()


def _client(port: int, pki: dict, who: str) -> th.InferenceServerClient:
  """Unmodified tritonclient.http over HTTPS presenting the certificate `who`."""
  def context():
    ctx = gevent.ssl.create_default_context(cafile=pki["ca"].cert_file)
    ctx.load_cert_chain(*pki[who])
    return ctx
  return th.InferenceServerClient(f"localhost:{port}", ssl=True, ssl_context_factory=context)


def _infer(c: th.InferenceServerClient) -> np.ndarray:
  inputs = []
  for name, arr, dt in (("x", X, "FP32"), ("k", K, "INT32")):
    i = th.InferInput(name, list(arr.shape), dt)
    i.set_data_from_numpy(arr, binary_data=True)
    inputs.append(i)
  res = c.infer("mock", inputs, outputs=[th.InferRequestedOutput("y", binary_data=True)])
  return res.as_numpy("y")


def _tenant_counts(bg, tenant: str) -> tuple[float, float]:
  with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics") as r:
    text = r.read().decode()
  return tuple(metric(text, "xlaserve_tenant_requests_total", tenant=tenant, outcome=o)
               for o in ("admitted", "over_quota"))


def _https(mock_repo, pki, **kw):
  cert, key = pki["server"]
  return serving(mock_repo, mock_factory(), tenants=TENANTS, tls_cert_file=cert,
                 tls_key_file=key, tls_client_ca_file=pki["ca"].cert_file, http_port=0,
                 metrics_port=0, **kw)


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_native_https_certificates_name_tenants(mock_repo, pki):
  y = mock_reference(X, K)["y"]
  with _https(mock_repo, pki) as bg:
    assert bg.server.http_frontend == "native"
    port, stats = bg.server.http_port, bg.server.native.stats
    relayed = stats()["http_relayed"]
    with _client(port, pki, "cn") as c:  # binary tensors: the C++ fast path
      for _ in range(3):
        np.testing.assert_array_equal(_infer(c), y)
      with pytest.raises(InferenceServerException,
                         match="tenant 'by-cn' is over its quota of 0.01 requests/s"):
        _infer(c)
    assert stats()["http_relayed"] == relayed  # decided and charged in C++
    # A forged mark is dropped: the request stays its certificate's tenant (over quota).
    assert _call(port, pki, "cn", "POST", "/v2/models/mock/infer", JSON_INFER,
                 {"x-xlaserve-tenant": "polite"}) == (
        429, {"error": "tenant 'by-cn' is over its quota of 0.01 requests/s"})
    assert _tenant_counts(bg, "by-cn") == (3, 2)
    # The SAN's tenant, on relayed calls (JSON tensors, repository index, metadata) and the
    # fast path alike: one set of buckets.
    assert _call(port, pki, "san", "POST", "/v2/models/mock/infer", JSON_INFER)[0] == 200
    status, index = _call(port, pki, "san", "POST", "/v2/repository/index", b"{}")
    assert status == 200 and "mock" in {m["name"] for m in index}
    assert _call(port, pki, "san", "GET", "/v2/models/mock")[1]["name"] == "mock"
    with _client(port, pki, "san") as c:
      np.testing.assert_array_equal(_infer(c), y)
    assert _call(port, pki, "san", "POST", "/v2/models/mock/infer", JSON_INFER)[0] == 200
    assert _call(port, pki, "san", "POST", "/v2/models/mock/infer", JSON_INFER) == (
        429, {"error": "tenant 'by-san' is over its quota of 0.01 requests/s"})
    assert stats()["http_relayed"] >= relayed + 5
    assert _tenant_counts(bg, "by-san") == (3, 1)
    _stranger_is_refused(port, pki, bg)


def _stranger_is_refused(port: int, pki: dict, bg) -> None:
  """A certificate the CA signed whose names are no tenant's: 401 everywhere, a forged mark
  (relayed, or in a connection tunnelled unparsed) changes nothing; a token still counts."""
  with _client(port, pki, "stranger") as c:
    with pytest.raises(InferenceServerException, match="no tenant has these credentials"):
      _infer(c)
  forged = {"x-xlaserve-tenant": "polite"}
  for method, path, body in (("POST", "/v2/models/mock/infer", JSON_INFER),
                             ("GET", "/v2/models/mock", b""),
                             ("POST", "/v2/repository/index", b"{}")):
    for headers in ({}, forged):
      status, reply = _call(port, pki, "stranger", method, path, body, headers)
      assert status == 401 and "no tenant" in reply["error"], (path, headers)
  tunnels = bg.server.native.stats()["http_tunnels"]
  status, reply = _call(port, pki, "stranger", "POST", "/v2/models/mock/infer",
                        iter([JSON_INFER]), forged)  # chunked: tunnelled to Python unparsed
  assert status == 401 and "no tenant" in reply["error"]
  assert bg.server.native.stats()["http_tunnels"] == tunnels + 1
  before = _tenant_counts(bg, "polite")
  assert _call(port, pki, "stranger", "POST", "/v2/models/mock/infer", JSON_INFER,
               {"Authorization": "Bearer tok-polite"})[0] == 200
  assert _tenant_counts(bg, "polite") == (before[0] + 1, 0)


def test_python_https_maps_no_certificates(mock_repo, pki):
  """uvicorn 0.54 puts no TLS peer in the ASGI scope: a certificate alone is no tenant there."""
  with _https(mock_repo, pki, http_frontend="python") as bg:
    assert bg.server.http_frontend == "python"
    port = bg.server.http_port
    for headers in ({}, {"x-xlaserve-tenant": "by-cn"}):
      status, reply = _call(port, pki, "cn", "POST", "/v2/models/mock/infer", JSON_INFER, headers)
      assert status == 401 and "no tenant" in reply["error"]
    assert _call(port, pki, "cn", "POST", "/v2/models/mock/infer", JSON_INFER,
                 {"Authorization": "Bearer tok-polite"})[0] == 200
    assert _tenant_counts(bg, "polite") == (1, 0)
