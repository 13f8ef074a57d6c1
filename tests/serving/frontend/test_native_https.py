"""HTTPS on the HTTP port against the real server: the native HTTP front end terminates TLS itself
(binary-tensor inference answered in C++, the rest relayed to Python in plain HTTP behind it),
requires client certificates under --tls-client-ca, and serves a renewed certificate without a
restart; the Python front end (uvicorn) requires client certificates too."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl

import numpy as np
import pytest
import tritonclient.http as th

from pki import Ca
from serving.frontend import native as native_frontend
from servingutil import mock_factory, mock_reference, serving, wait_until

NATIVE, WHY = native_frontend.load_extension()
X = np.arange(8, dtype=np.float32).reshape(2, 4)
K = np.full((2, 1), 2, np.int32)


def _call(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None, *,
          ca: str, client: tuple[str, str] | None) -> tuple[int, bytes] | None:
  """(status, body) over HTTPS trusting `ca` with the client certificate; None when refused."""
  ctx = ssl.create_default_context(cafile=ca)
  if client is not None:
    ctx.load_cert_chain(*client)
  conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.read()
  except (ssl.SSLError, ConnectionError, OSError):
    return None
  finally:
    conn.close()


def _binary_infer() -> tuple[bytes, dict]:
  inputs = []
  for name, arr, dt in (("x", X, "FP32"), ("k", K, "INT32")):
    i = th.InferInput(name, list(arr.shape), dt)
    i.set_data_from_numpy(arr, binary_data=True)
    inputs.append(i)
  body, n = th.InferenceServerClient.generate_request_body(
      inputs, outputs=[th.InferRequestedOutput("y", binary_data=True)])
  return body, {"Inference-Header-Content-Length": str(n)}


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_native_https_with_client_certificates_and_a_renewed_certificate(mock_repo, tmp_path):
  ca, ca2 = Ca(tmp_path / "ca"), Ca(tmp_path / "ca2", "second CA")
  cert, key = tmp_path / "server.crt", tmp_path / "server.key"
  for src, dst in zip(ca.issue("localhost", server=True), (cert, key)):
    shutil.copy(src, dst)
  client = ca.issue("client-a")
  with serving(mock_repo, mock_factory(), tls_cert_file=str(cert), tls_key_file=str(key),
               tls_client_ca_file=ca.cert_file, http_port=0, tls_reload_s=1) as bg:
    assert bg.server.http_frontend == "native"
    port = bg.server.http_port
    fast = bg.server.native.stats()["http_fast"]
    body, headers = _binary_infer()
    for _ in range(3):  # keep-alive aside, each a fresh TLS connection
      status, reply = _call(port, "POST", "/v2/models/mock/infer", body, headers, ca=ca.cert_file,
                            client=client)
      assert status == 200
      np.testing.assert_array_equal(np.frombuffer(reply[-8:], np.float32),
                                    mock_reference(X, K)["y"].ravel())
    assert bg.server.native.stats()["http_fast"] == fast + 3  # answered in C++ over TLS
    status, reply = _call(port, "POST", "/v2/models/mock/infer", json.dumps({"inputs": [
        {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist()},
        {"name": "k", "shape": [2, 1], "datatype": "INT32", "data": K.ravel().tolist()}]}).encode(),
        ca=ca.cert_file, client=client)  # JSON: relayed to Python behind the TLS
    assert status == 200 and json.loads(reply)["outputs"][0]["data"] == \
        mock_reference(X, K)["y"].ravel().tolist()
    assert _call(port, "GET", "/v2/health/ready", ca=ca.cert_file, client=client)[0] == 200
    assert _call(port, "GET", "/v2/health/ready", ca=ca.cert_file, client=None) is None
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
      plain.request("GET", "/v2/health/ready")
      plain.getresponse().read()
    new_cert, new_key = ca2.issue("localhost-2", server=True)
    shutil.copy(new_key, tmp_path / "k.tmp")
    shutil.copy(new_cert, tmp_path / "c.tmp")
    (tmp_path / "k.tmp").replace(key)
    (tmp_path / "c.tmp").replace(cert)
    assert wait_until(lambda: _call(port, "GET", "/v2/health/ready", ca=ca2.cert_file,
                                    client=client) is not None, timeout=10, step=0.2)
    assert _call(port, "POST", "/v2/models/mock/infer", body, headers, ca=ca2.cert_file,
                 client=client)[0] == 200


def test_python_https_requires_client_certificates_too(mock_repo, tmp_path):
  ca = Ca(tmp_path / "ca")
  cert, key = ca.issue("localhost", server=True)
  client = ca.issue("client-a")
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key,
               tls_client_ca_file=ca.cert_file, http_port=0, frontend="python") as bg:
    port = bg.server.http_port
    assert _call(port, "GET", "/v2/health/ready", ca=ca.cert_file, client=client)[0] == 200
    assert _call(port, "GET", "/v2/health/ready", ca=ca.cert_file, client=None) is None
