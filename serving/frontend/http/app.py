"""The ASGI application: one HTTP request in, one reply (or a server-sent event stream) out.

It checks the bearer token, reads the body within the size limit (inflating a gzip or deflate
body), asks the routes for the handler and turns every error into Triton's `{"error": "..."}`
with the status Triton's HTTP server gives its code (`HTTP_STATUS`). It is a plain ASGI 3
callable with no framework between it and the server: uvicorn's httptools protocol measured
fastest (see serving/frontend/http/__init__.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import zlib
from typing import Any, AsyncIterator, Awaitable, Callable

from serving.frontend import refusals
from serving.frontend.auth import bearer_matches
from serving.frontend.tenant_gate import MARKER
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)

JSON_TYPE = b"application/json"
# Triton's HTTP status for each error code (http_server.cc HttpCodeFromError: UNAVAILABLE,
# which Triton also gives a full queue and a request timeout, is 503; INVALID_ARG, UNKNOWN and
# CANCELLED are 400); UNAUTHENTICATED is 401 as for any bearer-token API.
HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.RESOURCE_EXHAUSTED: 503,
    Code.DEADLINE_EXCEEDED: 503, Code.UNAVAILABLE: 503, Code.INTERNAL: 500,
    Code.UNAUTHENTICATED: 401, Code.CANCELLED: 400,
}
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})  # as gRPC's ServerLive/Ready
UNAUTHENTICATED = "missing or wrong credentials: send the header 'Authorization: Bearer <token>'"


class HttpError(Exception):
  """An HTTP-level refusal with no gRPC counterpart (unknown path, method, body too large)."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


@dataclasses.dataclass(slots=True)
class Request:
  """What a handler gets: the method, the decoded path, the headers (lower-case names) and
  the whole body; `receive` (ASGI's, after the body) tells a waiting handler the client left."""

  method: str
  path: str
  headers: dict[bytes, bytes]
  body: bytes = b""
  receive: Callable[[], Awaitable[dict]] | None = None


@dataclasses.dataclass(slots=True)
class Reply:
  """A whole response."""

  status: int = 200
  body: bytes = b""
  content_type: bytes = JSON_TYPE
  headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class StreamReply:
  """A response sent as it is produced (server-sent events): `chunks` yields the body's pieces;
  `cancel` runs if the client goes away first."""

  chunks: AsyncIterator[bytes]
  cancel: Callable[[], None]
  content_type: bytes = b"text/event-stream"


Handler = Callable[..., Awaitable["Reply | StreamReply"]]


def json_reply(obj: Any, status: int = 200) -> Reply:
  return Reply(status, json.dumps(obj, separators=(",", ":")).encode())


def error_reply(status: int, message: str) -> Reply:
  """Triton's error body: `{"error": "<message>"}`."""
  reply = json_reply({"error": message}, status)
  if status == 401:
    reply.headers.append((b"www-authenticate", b"Bearer"))
  return reply


def _inflate(body: bytes, encoding: bytes, limit: int) -> bytes:
  """A gzip or deflate (zlib) request body, inflated to at most `limit` bytes."""
  kind = encoding.strip().lower()
  if kind not in (b"gzip", b"deflate"):
    raise HttpError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported"
                    " (gzip, deflate)")
  inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if kind == b"gzip" else zlib.MAX_WBITS)
  try:
    out = inflater.decompress(body, limit + 1)
  except zlib.error as e:
    raise ServingError(Code.INVALID_ARGUMENT, f"the {kind.decode()} request body does not"
                       f" inflate: {e}") from None
  if len(out) > limit:
    raise HttpError(413, f"the inflated request body exceeds the limit of {limit} bytes")
  return out


def _accepted_encoding(accept: bytes | None) -> bytes | None:
  """gzip or deflate when the client accepts it (Triton compresses only when asked)."""
  if not accept:
    return None
  offered = {}
  for item in accept.lower().split(b","):
    name, _, params = item.strip().partition(b";")
    offered[name.strip()] = b"q=0" not in params.replace(b" ", b"")
  for kind in (b"gzip", b"deflate"):
    if offered.get(kind):
      return kind
  return None


def _deflate(body: bytes, kind: bytes) -> bytes:
  packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS if kind == b"gzip"
                            else zlib.MAX_WBITS)
  return packer.compress(body) + packer.flush()


class HttpApp:
  """ASGI 3 application over `lookup(method, path) -> (handler, args)`, which raises
  HttpError or ServingError for a path it does not serve."""

  def __init__(self, lookup: Callable[[str, str], tuple[Handler, tuple]], *,
               auth_token: str | None, max_body_bytes: int):
    self._lookup = lookup
    self._token = auth_token.encode() if auth_token else None
    self._limit = max_body_bytes
    self.denied = 0  # requests refused for want of the token
    self.tenants = None  # --tenants: a TenantGate (serving/frontend/tenant_gate.py)

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
      return
    headers = dict(scope["headers"])
    req = Request(scope["method"], scope["path"], headers, receive=receive)
    try:
      if self._token is not None and req.path not in OPEN_PATHS and not bearer_matches(
          headers.get(b"authorization", b""), self._token):
        self.denied += 1
        logger.info("unauthenticated HTTP request to %s refused", req.path,
                    extra={"method": req.path, "code": "UNAUTHENTICATED"})
        raise ServingError(Code.UNAUTHENTICATED, UNAUTHENTICATED)
      if self.tenants is not None and req.path not in OPEN_PATHS:
        self._enter_tenant(headers)
      handler, args = self._lookup(req.method, req.path)
      req.body = await self._read_body(receive, headers)
      reply = await handler(req, *args)
    except ServingError as e:  # a tenant over its quota: 429, held (so are bad credentials)
      await refusals.hold(getattr(e, "hold_s", 0.0)
                          or (refusals.MAX_HOLD_S if e.code == Code.UNAUTHENTICATED else 0.0))
      reply = error_reply(getattr(e, "http_status", 0) or HTTP_STATUS[e.code], e.message)
    except HttpError as e:
      reply = error_reply(e.status, e.message)
    except Exception as e:  # a bug: answer 500, keep serving
      logger.exception("HTTP %s %s failed", req.method, req.path)
      reply = error_reply(500, f"internal error: {type(e).__name__}: {e}")
    if isinstance(reply, StreamReply):
      await _send_stream(reply, receive, send)
      return
    body = reply.body
    out = [(b"content-type", reply.content_type), *reply.headers]
    kind = _accepted_encoding(headers.get(b"accept-encoding")) if len(body) > 0 else None
    if kind is not None:
      body = _deflate(body, kind)
      out.append((b"content-encoding", kind))
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": out})
    await send({"type": "http.response.body", "body": body})

  def _enter_tenant(self, headers: dict[bytes, bytes]) -> None:
    """Decides the request's tenant (kept for the rest of the request) from its bearer token, or
    the native relay's mark (token or client certificate); none: UNAUTHENTICATED."""
    gate = self.tenants
    tenant = gate.identify_http(headers.get(b"authorization"), headers.get(MARKER.encode()))
    if tenant < 0:
      gate.unknown += 1
      raise ServingError(Code.UNAUTHENTICATED, "no tenant has these credentials: send the header"
                         " 'Authorization: Bearer <token>' with a tenant's token, or (HTTPS"
                         " through the native front end) a client certificate naming one of"
                         " its identities")
    gate.current.set(tenant)

  async def _read_body(self, receive: Callable, headers: dict[bytes, bytes]) -> bytes:
    """The whole request body (refused early when Content-Length is over the limit)."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > self._limit:
      raise HttpError(413, f"the request body of {int(declared)} bytes exceeds the limit of"
                      f" {self._limit} bytes (--max-message-bytes)")
    msg = await receive()
    body = msg.get("body", b"")
    if msg.get("more_body"):
      chunks, size = [body], len(body)
      while msg.get("more_body"):
        msg = await receive()
        chunks.append(msg.get("body", b""))
        size += len(chunks[-1])
        if size > self._limit:
          raise HttpError(413, f"the request body exceeds the limit of {self._limit} bytes"
                          " (--max-message-bytes)")
      body = b"".join(chunks)
    if msg["type"] == "http.disconnect":
      raise HttpError(400, "the client disconnected before sending the whole body")
    encoding = headers.get(b"content-encoding")
    if encoding is not None and encoding.strip().lower() != b"identity":
      body = _inflate(body, encoding, self._limit)
    return body


async def _send_stream(reply: StreamReply, receive: Callable, send: Callable) -> None:
  """Sends the chunks as they come; the client leaving cancels the producer (`cancel` must be
  idempotent and end `chunks`)."""

  async def watch() -> None:
    while (await receive())["type"] != "http.disconnect":
      pass
    reply.cancel()

  watcher = asyncio.ensure_future(watch())
  finished = False
  try:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", reply.content_type), (b"cache-control", b"no-cache")]})
    async for chunk in reply.chunks:
      if watcher.done():
        break
      await send({"type": "http.response.body", "body": chunk, "more_body": True})
    else:
      finished = True
    await send({"type": "http.response.body", "body": b""})
  finally:
    watcher.cancel()
    if not finished:
      reply.cancel()
