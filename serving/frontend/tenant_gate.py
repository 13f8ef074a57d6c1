"""Where the Python front ends meet the tenant table (serving/frontend/tenants.py).

`TenantGate` decides a call's tenant (gRPC: `TenantInterceptor`, which wraps each guarded
method's handler; HTTP: `HttpApp`) and keeps it in a context variable for the rest of the call;
the servicer's `infer`, once it knows the rows, calls `admit`, which charges the tenant's buckets
and gives the request its tenant's priority. Behind the native front end the table is the C++ one
(`_native.Tenants`), so every path charges the same buckets, and the relay's mark
(`x-xlaserve-tenant`: the tenant the C++ side identified, from a token or a client certificate
that grpc.aio and uvicorn behind the relay never see) is trusted; a client cannot send that mark
through it. Over HTTP the mark also carries the C++ table's secret (`from_relay_mark`), since a
connection the native HTTP server tunnels unparsed reaches uvicorn with the client's own headers.
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

import grpc

from serving.frontend import refusals
from serving.frontend.auth import OPEN_METHODS
from serving.frontend.tenants import OverQuota, effective_priority

logger = logging.getLogger(__name__)

MARKER = "x-xlaserve-tenant"
UNKNOWN = ("no tenant has these credentials: send metadata 'authorization: Bearer <token>' with"
           " a tenant's token, or a client certificate naming one of its identities")
PEER_NAMES = ("x509_common_name", "x509_subject_alternative_name")


class TenantGate:
  """Identification and admission over a tenant table (Python `TenantTable` or C++ `Tenants`);
  `trust_marker`: the relay's `x-xlaserve-tenant` mark decides (behind the native front end)."""

  def __init__(self, table: Any, *, trust_marker: bool = False):
    self.table = table
    self.trust_marker = trust_marker
    self.unknown = 0  # calls refused UNAUTHENTICATED for want of a tenant
    self.current: contextvars.ContextVar[int] = contextvars.ContextVar("xlaserve_tenant",
                                                                       default=-1)

  def identify(self, authorization: str | bytes | None, identities: Sequence[str],
               marker: str | None = None) -> int:
    """The tenant index (-1: none) from a request's credentials or the relay's mark."""
    if self.trust_marker and marker:
      return self.table.index(marker)
    return self.table.identify(authorization, list(identities))

  def identify_http(self, authorization: bytes | None, mark: bytes | None) -> int:
    """An HTTP request's tenant (-1: none): the native relay's mark when it is genuine (it was
    decided from the token, else the client certificate), else the bearer token alone (uvicorn
    exposes no client certificate to the app)."""
    if self.trust_marker and mark:
      tenant = self.table.from_relay_mark(mark.decode("ascii", "replace"))
      if tenant >= 0:
        return tenant
    return self.table.identify(authorization, [])

  def admit(self, rows: int, priority: int) -> int:
    """Charges the current call's tenant for one request of `rows` rows; returns the request's
    priority under its tenant's. Raises OverQuota."""
    tenant = self.current.get()
    if tenant < 0:  # not a guarded call (in-process use): nothing to charge
      return priority
    why, retry_s = self.table.admit(tenant, rows, time.monotonic())
    if why:
      logger.info("%s", why, extra={"code": "RESOURCE_EXHAUSTED"})
      raise OverQuota(why, hold_s=refusals.spread(retry_s))
    return effective_priority(priority, self.table.priority(tenant))


def _grpc_tenant(gate: TenantGate, context: grpc.aio.ServicerContext) -> int:
  auth = marker = None
  for key, value in context.invocation_metadata() or ():
    if key == "authorization" and auth is None:
      auth = value
    elif key == MARKER and marker is None:
      marker = value
  names: list[str] = []
  if not (gate.trust_marker and marker):  # a certificate counts when the token is no tenant's
    peer = context.auth_context() or {}
    names = [v.decode("utf-8", "replace") for k in PEER_NAMES for v in peer.get(k, ())]
  return gate.identify(auth, names, marker)


async def _refuse(gate: TenantGate, context: grpc.aio.ServicerContext) -> None:
  gate.unknown += 1
  await refusals.hold(refusals.MAX_HOLD_S, context.time_remaining())
  await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNKNOWN)


def _wrap(gate: TenantGate, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
  """The handler, preceded by deciding its tenant (kept in `gate.current` for the call)."""
  if handler.unary_unary is not None:
    inner = handler.unary_unary

    async def unary_unary(request, context):
      if (t := _grpc_tenant(gate, context)) < 0:
        return await _refuse(gate, context)
      gate.current.set(t)
      return await inner(request, context)
    return handler._replace(unary_unary=unary_unary)
  if handler.stream_stream is not None:
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator, context):
      if (t := _grpc_tenant(gate, context)) < 0:
        await _refuse(gate, context)
        return
      gate.current.set(t)
      async for response in inner_ss(request_iterator, context):
        yield response
    return handler._replace(stream_stream=stream_stream)
  if handler.unary_stream is not None:
    inner_us = handler.unary_stream

    async def unary_stream(request, context):
      if (t := _grpc_tenant(gate, context)) < 0:
        await _refuse(gate, context)
        return
      gate.current.set(t)
      async for response in inner_us(request, context):
        yield response
    return handler._replace(unary_stream=unary_stream)
  inner_su = handler.stream_unary

  async def stream_unary(request_iterator, context):
    if (t := _grpc_tenant(gate, context)) < 0:
      return await _refuse(gate, context)
    gate.current.set(t)
    return await inner_su(request_iterator, context)
  return handler._replace(stream_unary=stream_unary)


class TenantInterceptor(grpc.aio.ServerInterceptor):
  """Every RPC but liveness, readiness and health must come from a tenant (else
  UNAUTHENTICATED, before its method runs)."""

  def __init__(self, gate: TenantGate):
    self.gate = gate

  async def intercept_service(
      self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
      details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
    handler = await continuation(details)
    if handler is None or details.method in OPEN_METHODS:
      return handler
    return _wrap(self.gate, handler)
