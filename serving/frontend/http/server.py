"""Starts and stops the HTTP front end on the server's own asyncio event loop.

uvicorn (with httptools) serves the ASGI app; the listening socket is bound here, so port 0
picks a free port and a port in use fails at start-up like the gRPC one. Stopping closes the
listener, lets requests already accepted finish (the server drains its runners first), closes
idle keep-alive connections, and cancels what is still open after `graceful_s`.

uvicorn writes a response's head and body with one `transport.write` each: two system calls
and two packets per response. Each connection's transport is wrapped so the writes of one
event-loop pass go out as one (`CoalescingTransport`): on the minimal app of
benchmarks/http_libs.py, 56 -> 51 us of server CPU per request and 7-12% more requests/s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from typing import Callable

from serving.frontend.auth import check_token
from serving.frontend.http.app import HttpApp
from serving.frontend.http.routes import Routes
from serving.frontend.servicer import InferenceServicer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class HttpConfig:
  """Where and how the HTTP front end listens."""

  host: str = "127.0.0.1"
  port: int = 8000  # 0: any free port
  tls_cert_file: str | None = None  # PEM chain; with tls_key_file: HTTPS
  tls_key_file: str | None = None
  tls_client_ca_file: str | None = None  # PEM CA bundle: HTTPS clients need a certificate it signed
  auth_token: str | None = dataclasses.field(default=None, repr=False)
  max_body_bytes: int = 64 << 20
  graceful_s: float = 5.0  # at stop: how long open connections may take to finish
  # A request must arrive whole (head and body) within this long of its first byte, or it gets
  # 408 and its connection closes: a client that dribbles bytes cannot hold a connection.
  read_timeout_s: float = 30.0
  # A keep-alive connection with no request for this long is closed (uvicorn's keep-alive
  # timeout; the native HTTP server's too). Keep it above a load balancer's idle timeout.
  idle_timeout_s: float = 60.0

  def __post_init__(self):
    if not 0 <= self.port < 65536:
      raise ValueError(f"HTTP port must be in 0..65535, got {self.port}")
    if (self.tls_cert_file is None) != (self.tls_key_file is None):
      raise ValueError("HTTPS needs both a certificate and a key file")
    if self.auth_token is not None:
      check_token(self.auth_token)
    if self.read_timeout_s <= 0:
      raise ValueError(f"read_timeout_s must be > 0, got {self.read_timeout_s}")
    if self.max_body_bytes < 1024:
      raise ValueError(f"max_body_bytes={self.max_body_bytes} is too small")


class CoalescingTransport:
  """A connection's transport whose writes within one event-loop pass leave as one write (in
  order, before a close); everything else is the wrapped transport's."""

  __slots__ = ("_transport", "_loop", "_pending")

  def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
    self._transport, self._loop = transport, loop
    self._pending: list[bytes] = []

  def write(self, data: bytes) -> None:
    if not self._pending:
      self._loop.call_soon(self._flush)
    self._pending.append(data)

  def _flush(self) -> None:
    pending, self._pending = self._pending, []
    if pending and not self._transport.is_closing():
      self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

  def close(self) -> None:
    self._flush()
    self._transport.close()

  def __getattr__(self, name: str):
    return getattr(self._transport, name)


REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: text/plain"
                   b"\r\ncontent-length: 30\r\n\r\nrequest not received in time\r\n")


def coalescing_protocol_class(read_timeout_s: float = 30.0) -> type:
  """uvicorn's httptools protocol over a CoalescingTransport (uvicorn.Config(http=...)), with a
  bound on how long one request may take to arrive (uvicorn has none: a client sending a byte
  now and then would hold its connection for ever)."""
  from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

  class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    _read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
      super().connection_made(CoalescingTransport(transport, self.loop))

    def on_message_begin(self) -> None:
      super().on_message_begin()
      self._read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

    def on_message_complete(self) -> None:
      self._stop_read_timer()
      super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
      self._stop_read_timer()
      super().connection_lost(exc)

    def _stop_read_timer(self) -> None:
      if self._read_timer is not None:
        self._read_timer.cancel()
        self._read_timer = None

    def _read_timed_out(self) -> None:
      self._read_timer = None
      if not self.transport.is_closing():
        logger.info("HTTP request from %s not received within %.0f s: 408, connection closed",
                    self.client, read_timeout_s)
        self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()

  return CoalescingHttpToolsProtocol


def _listen(host: str, port: int, unix_socket: str | None = None) -> socket.socket:
  if unix_socket is not None:  # private, behind the native HTTP server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(unix_socket)
    sock.listen(2048)
    return sock
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family, backlog=2048)
  except OSError as e:
    raise OSError(f"cannot listen for HTTP on {host}:{port} ({e.strerror or e}); pick another"
                  " --http-port (-1 disables HTTP)") from e


class HttpFrontend:
  """The KServe v2 HTTP/REST server of one xlaserve process."""

  def __init__(self, config: HttpConfig, servicer: InferenceServicer, *,
               is_ready: Callable[[], bool]):
    self.config = config
    self.routes = Routes(servicer, is_ready)
    self.app = HttpApp(self.routes.lookup, auth_token=config.auth_token,
                       max_body_bytes=config.max_body_bytes)
    self.app.tenants = servicer.tenant_gate  # --tenants: token, or the native relay's mark
    self.port: int | None = None
    self._server = None
    self._socket: socket.socket | None = None
    self._ticker: asyncio.Task | None = None

  @property
  def scheme(self) -> str:
    return "https" if self.config.tls_cert_file else "http"

  def _tls(self, unix_socket: str | None) -> dict:
    """uvicorn's TLS settings: none behind the native server (it terminates HTTPS itself)."""
    cfg = self.config
    if unix_socket is not None or cfg.tls_cert_file is None:
      return {}
    ca = cfg.tls_client_ca_file
    return {"ssl_certfile": cfg.tls_cert_file, "ssl_keyfile": cfg.tls_key_file,
            "ssl_ca_certs": ca, "ssl_cert_reqs": ssl.CERT_REQUIRED if ca else ssl.CERT_NONE}

  async def start(self, unix_socket: str | None = None) -> int:
    """Binds (host:port, or the private `unix_socket` the native HTTP server relays to) and
    starts serving on the running loop; returns the port (0 on a unix socket)."""
    import uvicorn

    cfg = self.config
    ucfg = uvicorn.Config(
        self.app, host=cfg.host, port=cfg.port, http=coalescing_protocol_class(cfg.read_timeout_s),
        ws="none", lifespan="off", interface="asgi3", log_config=None, access_log=False,
        proxy_headers=False, server_header=False, **self._tls(unix_socket),
        timeout_graceful_shutdown=max(1, round(cfg.graceful_s)),
        timeout_keep_alive=cfg.idle_timeout_s if cfg.idle_timeout_s > 0 else 1e9)
    ucfg.load()  # the TLS context (a bad certificate fails here) and the protocol class
    self._socket = _listen(cfg.host, cfg.port, unix_socket)
    server = uvicorn.Server(ucfg)
    server.lifespan = ucfg.lifespan_class(ucfg)  # what Server.serve sets before startup
    try:
      await server.startup(sockets=[self._socket])
    except BaseException:
      self._socket.close()
      raise
    self._server = server
    self._ticker = asyncio.ensure_future(server.main_loop())  # the Date header, once a second
    self.port = 0 if unix_socket is not None else self._socket.getsockname()[1]
    return self.port

  async def stop(self) -> None:
    """Closes the listener and every connection once its reply is sent."""
    server = self._server
    if server is None:
      return
    self._server = None
    server.should_exit = True
    if self._ticker is not None:
      await self._ticker
    await server.shutdown(sockets=[self._socket])
