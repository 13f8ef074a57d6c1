"""Bearer-token authentication for the gRPC server, as a server interceptor (the HTTP front end
checks the same header with `bearer_matches`).

With a token configured, every RPC must carry the metadata `authorization: Bearer
<token>`; one without it (or with another token) gets UNAUTHENTICATED before its
method runs: the request is not even deserialized, so no model work is done.
Liveness and readiness stay open (ServerLive, ServerReady and grpc.health.v1), so
load balancers and Kubernetes probes need no secret; they reveal nothing about models.

The token comes from a file (`--auth-token-file`) or the `XLASERVE_AUTH_TOKEN`
environment variable, never from a command-line value, which other users of the
host can read in the process list.
"""

from __future__ import annotations

import hmac
import logging
import os
import pathlib
from typing import Any, Awaitable, Callable, Iterable

import grpc

from serving.frontend import refusals

logger = logging.getLogger(__name__)

TOKEN_ENV = "XLASERVE_AUTH_TOKEN"
OPEN_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})


def check_token(token: str) -> str:
  """Validates a token (printable ASCII, no whitespace: it travels as gRPC metadata)."""
  if not token:
    raise ValueError("the auth token is empty")
  if not all(33 <= ord(c) < 127 for c in token):
    raise ValueError("the auth token must be printable ASCII without spaces")
  return token


def load_token(path: str | os.PathLike[str] | None = None,
               environ: dict[str, str] | None = None) -> str | None:
  """The token from `path` (surrounding whitespace stripped) or $XLASERVE_AUTH_TOKEN; None if
  neither is set. Giving both is an error, so a stale variable cannot silently win."""
  env = (os.environ if environ is None else environ).get(TOKEN_ENV)
  if path is not None and env:
    raise ValueError(f"both --auth-token-file and ${TOKEN_ENV} are set; use one")
  if path is not None:
    try:
      return check_token(pathlib.Path(path).read_text().strip())
    except OSError as e:
      raise ValueError(f"cannot read the auth token file {path}: {e.strerror}") from e
  return check_token(env.strip()) if env else None


def bearer_matches(value: str | bytes, token: bytes) -> bool:
  """Whether an `authorization` value (gRPC metadata or HTTP header) is `Bearer <token>`;
  compared in constant time."""
  if isinstance(value, str):
    value = value.encode("ascii", "replace")
  scheme, _, given = value.partition(b" ")
  return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


async def _deny_unary(request: bytes, context: grpc.aio.ServicerContext) -> None:
  await refusals.hold(refusals.MAX_HOLD_S, context.time_remaining())
  await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "missing or wrong credentials: send metadata 'authorization: Bearer <token>'")


async def _deny_stream(request_iterator, context: grpc.aio.ServicerContext) -> None:
  await _deny_unary(b"", context)


_DENY = {
    (False, False): grpc.unary_unary_rpc_method_handler(_deny_unary),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny_unary),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny_stream),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny_stream),
}


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Lets an RPC through only with the right bearer token (or when its method is open)."""

  def __init__(self, token: str, *, open_methods: Iterable[str] = OPEN_METHODS,
               native: Callable[[], Any] = lambda: None):
    self._token = check_token(token).encode()
    self._open = frozenset(open_methods)
    self._denied = 0
    self._native = native  # the native front end (or None): it refuses ModelInfers itself

  @property
  def denied(self) -> int:
    """Calls refused here and, behind the native front end, ModelInfers refused in C++."""
    fe = self._native()
    return self._denied + (fe.stats().get("denied", 0) if fe is not None else 0)

  def _authorized(self, metadata) -> bool:
    for key, value in metadata or ():
      if key == "authorization":
        return bearer_matches(value, self._token)
    return False

  async def intercept_service(
      self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
      details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
    if details.method in self._open or self._authorized(details.invocation_metadata):
      return await continuation(details)
    self._denied += 1
    logger.info("unauthenticated call to %s refused", details.method,
                extra={"method": details.method, "code": "UNAUTHENTICATED"})
    handler = await continuation(details)  # looks the handler up; runs nothing
    kind = (False, False) if handler is None else (handler.request_streaming,
                                                    handler.response_streaming)
    return _DENY[kind]


def server_credentials(cert_file: str | None, key_file: str | None,
                       client_ca_file: str | None = None) -> grpc.ServerCredentials | None:
  """TLS credentials from PEM files, or None for plaintext (no certificate file); with a client
  CA bundle, mutual TLS (a client must present a certificate it signed)."""
  if cert_file is None:
    return None
  try:
    cert = pathlib.Path(cert_file).read_bytes()
    key = pathlib.Path(key_file).read_bytes()
    ca = pathlib.Path(client_ca_file).read_bytes() if client_ca_file else None
  except OSError as e:
    raise OSError(f"cannot read TLS file {e.filename}: {e.strerror}") from e
  return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                     require_client_auth=ca is not None)
