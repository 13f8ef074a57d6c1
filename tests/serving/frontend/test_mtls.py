"""Mutual TLS (--tls-client-ca) against the real server with unmodified tritonclient: a client
whose certificate the CA signed is served; one without a certificate, or with one another CA
signed, is refused at the handshake; a renewed CA bundle is picked up without a restart."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from clientutil import assert_served_like
from pki import Ca
from serving.frontend import native as native_frontend
from servingutil import mock_factory, mock_reference, serving, wait_until

NATIVE, WHY = native_frontend.load_extension()
FRONTENDS = [pytest.param("native", marks=pytest.mark.skipif(NATIVE is None, reason=WHY)),
             "python"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
  d = tmp_path_factory.mktemp("pki")
  ca, other = Ca(d / "ca"), Ca(d / "other", "other CA")
  return ca, ca.issue("localhost", server=True), ca.issue("scorer-a"), other.issue("scorer-a")


def _client(address: str, ca: Ca, creds: tuple[str, str] | None) -> tc.InferenceServerClient:
  return tc.InferenceServerClient(address, ssl=True, root_certificates=ca.cert_file,
                                  private_key=creds[1] if creds else None,
                                  certificate_chain=creds[0] if creds else None)


def _live(address: str, ca: Ca, creds: tuple[str, str] | None) -> bool:
  try:
    with _client(address, ca, creds) as c:
      return c.is_server_live(client_timeout=5)
  except InferenceServerException:
    return False


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_only_clients_the_ca_signed_are_served(mock_repo, pki, frontend):
  ca, (cert, key), good, foreign = pki
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key,
               tls_client_ca_file=ca.cert_file, frontend=frontend) as bg:
    assert bg.server.frontend == frontend
    with _client(bg.address, ca, good) as c:
      x = np.arange(8, dtype=np.float32).reshape(2, 4)
      k = np.full((2, 1), 2, np.int32)
      assert assert_served_like(c, "mock", [{"x": x, "k": k}], mock_reference) == 1
    assert not _live(bg.address, ca, None)  # no client certificate
    assert not _live(bg.address, ca, foreign)  # signed by another CA
    assert _live(bg.address, ca, good)  # and the server still serves


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_a_renewed_client_ca_is_picked_up_without_a_restart(mock_repo, pki, tmp_path):
  ca, (cert, key), good, _ = pki
  bundle = tmp_path / "clients.pem"
  shutil.copy(ca.cert_file, bundle)
  new_ca = Ca(tmp_path / "new", "new CA")
  newcomer = new_ca.issue("scorer-b")
  with serving(mock_repo, mock_factory(), tls_cert_file=cert, tls_key_file=key,
               tls_client_ca_file=str(bundle), tls_reload_s=1) as bg:
    assert _live(bg.address, ca, good) and not _live(bg.address, ca, newcomer)
    tmp = tmp_path / "clients.tmp"
    tmp.write_bytes(open(ca.cert_file, "rb").read() + open(new_ca.cert_file, "rb").read())
    os.replace(tmp, bundle)  # both CAs now
    assert wait_until(lambda: _live(bg.address, ca, newcomer), timeout=10, step=0.2)
    assert _live(bg.address, ca, good)


def test_a_client_ca_without_tls_is_refused(mock_repo):
  from serving.server_config import ServerConfig
  with pytest.raises(ValueError, match="--tls-client-ca"):
    ServerConfig(model_repository=str(mock_repo), tls_client_ca_file="ca.pem")
