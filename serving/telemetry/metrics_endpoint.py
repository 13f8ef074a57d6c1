"""The Prometheus endpoint of the metrics port: plain HTTP, or HTTPS (`--metrics-tls`) with the
server's certificate files, client certificates required under `--tls-client-ca`, and the files
re-read when they change (checked every `reload_s`), so a renewed certificate serves new scrapes
without a restart, as on the gRPC port."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from typing import Any

import prometheus_client as prom

logger = logging.getLogger(__name__)


class MetricsEndpoint:
  """prometheus_client's HTTP server, and the thread that reloads its certificate files."""

  def __init__(self, host: str, port: int, registry: Any, *,
               tls: tuple[str, str, str | None, float] | None = None):
    """`tls`: (certificate chain, key, client CA bundle or None, seconds between checks)."""
    cert, key, ca, reload_s = tls if tls is not None else (None, None, None, 0.0)
    self._httpd, _ = prom.start_http_server(port, host, registry=registry, certfile=cert,
                                            keyfile=key, client_cafile=ca,
                                            client_auth_required=ca is not None)
    self.server_address = self._httpd.server_address
    self._stop = threading.Event()
    self._files = [f for f in (cert, key, ca) if f]
    if tls is not None:
      self._seen = self._stamps()
      threading.Thread(target=self._watch, args=(cert, key, ca, reload_s), name="metrics-tls",
                       daemon=True).start()

  def _stamps(self) -> tuple:
    stamps = []
    for f in self._files:
      try:
        st = os.stat(f)
        stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
      except OSError:
        stamps.append(None)
    return tuple(stamps)

  def _watch(self, cert: str, key: str, ca: str | None, reload_s: float) -> None:
    """Re-reads the files into the listening socket's context when they change: new
    connections get the new certificate (and CA bundle; CAs are added, never dropped)."""
    ctx: ssl.SSLContext = self._httpd.socket.context
    while not self._stop.wait(reload_s):
      if (now := self._stamps()) == self._seen:
        continue
      try:
        ctx.load_cert_chain(cert, key)
        if ca:
          ctx.load_verify_locations(ca)
        self._seen = now
        logger.info("metrics port: reloaded its TLS certificate")
      except (OSError, ssl.SSLError) as e:  # half-written files: the next check retries
        logger.warning("metrics port: cannot reload its TLS files yet: %s", e)

  def shutdown(self) -> None:
    self._stop.set()
    self._httpd.shutdown()
