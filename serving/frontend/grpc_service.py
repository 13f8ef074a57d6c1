"""Registers Triton's `inference.GRPCInferenceService` on a grpc.aio server with every unary
method's request parsing guarded: undecodable bytes get INVALID_ARGUMENT, not UNKNOWN."""

from __future__ import annotations

import grpc

from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.frontend.servicer import InferenceServicer

SERVICE_NAME = "inference.GRPCInferenceService"


class _Undecodable:
  """Stands in for a request message whose bytes did not parse."""

  __slots__ = ("error",)

  def __init__(self, error: str):
    self.error = error


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
  """Undecodable bytes on a unary-request method get INVALID_ARGUMENT, not gRPC's UNKNOWN
  (and not a logged traceback per hostile request)."""
  if (handler.request_streaming or handler.response_streaming
      or handler.request_deserializer is None):
    return handler
  parse, inner = handler.request_deserializer, handler.unary_unary

  def safe_parse(data: bytes):
    try:
      return parse(data)
    except Exception as e:  # protobuf raises DecodeError (and others for some corruptions)
      return _Undecodable(f"{type(e).__name__}: {e}")

  async def behaviour(request, context):
    if type(request) is _Undecodable:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is not a valid protobuf message: {request.error}")
    return await inner(request, context)

  return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=safe_parse,
                                             response_serializer=handler.response_serializer)


def add_inference_service(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
  """Registers the Triton service with every unary method's request parsing guarded."""
  captured: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

  class Capture:
    def add_generic_rpc_handlers(self, handlers) -> None:
      pass

    def add_registered_method_handlers(self, service: str, handlers) -> None:
      captured[service] = handlers

  pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Capture())
  if not captured:  # generated code without registered handlers: register it unguarded
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return
  for service, handlers in captured.items():
    guarded = {method: _guard(h) for method, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
    server.add_registered_method_handlers(service, guarded)


