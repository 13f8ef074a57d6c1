"""An OTLP trace receiver speaking the real protocol (OTLP/gRPC), for the tracing tests."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from typing import Iterator

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SERVER, INTERNAL = 2, 1  # OTLP span kinds


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
  """An OTLP trace receiver: keeps every span exported to it, with its service.name."""

  def __init__(self):
    self.spans: list = []
    self.services: set[str] = set()
    self._lock = threading.Lock()

  def Export(self, request, context):
    with self._lock:
      for rs in request.resource_spans:
        self.services.update(a.value.string_value for a in rs.resource.attributes
                             if a.key == "service.name")
        for ss in rs.scope_spans:
          self.spans.extend(ss.spans)
    return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple["_Receiver", str]]:
  """A receiver on a free loopback port: (receiver, "host:port")."""
  receiver = _Receiver()
  server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
  trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    yield receiver, f"127.0.0.1:{port}"
  finally:
    server.stop(0)
