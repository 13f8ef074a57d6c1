"""The metrics port over HTTPS (--metrics-tls) against the real server: only with the CA's trust
(and a client certificate under --tls-client-ca), never plain HTTP, and a renewed certificate is
served without a restart."""

from __future__ import annotations

import shutil
import ssl
import urllib.error
import urllib.request

import pytest

from pki import Ca
from servingutil import mock_factory, serving, wait_until


def _scrape(port: int, *, ca: str | None, client: tuple[str, str] | None = None) -> str | None:
  """The metrics text over HTTPS trusting `ca` (plain HTTP when None); None when refused."""
  try:
    if ca is None:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()
    ctx = ssl.create_default_context(cafile=ca)
    if client is not None:
      ctx.load_cert_chain(*client)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=ctx) as r:
      return r.read().decode()
  except (urllib.error.URLError, ssl.SSLError, ConnectionError, OSError):
    return None


def test_metrics_over_mutual_tls_with_a_renewed_certificate(mock_repo, tmp_path):
  ca, ca2 = Ca(tmp_path / "ca"), Ca(tmp_path / "ca2", "second CA")
  cert, key = tmp_path / "server.crt", tmp_path / "server.key"
  for src, dst in zip(ca.issue("localhost", server=True), (cert, key)):
    shutil.copy(src, dst)
  scraper = ca.issue("prometheus")
  with serving(mock_repo, mock_factory(), tls_cert_file=str(cert), tls_key_file=str(key),
               tls_client_ca_file=ca.cert_file, metrics_tls=True, metrics_port=0,
               tls_reload_s=1) as bg:
    port = bg.server.metrics_port
    text = _scrape(port, ca=ca.cert_file, client=scraper)
    assert text is not None and "nv_inference_request_success" in text
    assert _scrape(port, ca=ca.cert_file) is None  # no client certificate
    assert _scrape(port, ca=None) is None  # plain HTTP
    assert _scrape(port, ca=ca2.cert_file, client=scraper) is None
    new_cert, new_key = ca2.issue("localhost-2", server=True)
    shutil.copy(new_key, tmp_path / "k.tmp")  # key first: a pair that does not match is retried
    shutil.copy(new_cert, tmp_path / "c.tmp")
    (tmp_path / "k.tmp").replace(key)
    (tmp_path / "c.tmp").replace(cert)
    assert wait_until(lambda: _scrape(port, ca=ca2.cert_file, client=scraper) is not None,
                      timeout=10, step=0.2)  # no restart
    assert _scrape(port, ca=ca.cert_file, client=scraper) is None


def test_metrics_tls_needs_tls(mock_repo):
  from serving.server_config import ServerConfig
  with pytest.raises(ValueError, match="--metrics-tls needs TLS"):
    ServerConfig(model_repository=str(mock_repo), metrics_tls=True)
