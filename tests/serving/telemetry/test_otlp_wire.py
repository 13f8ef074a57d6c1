"""The hand-written OTLP span encoder against the OpenTelemetry SDK's own encoder (the
reference): the same spans must give the same ExportTraceServiceRequest, field for field.
The spans are the server's (a batch with native and Python requests, a client's parent and
tracestate, an error) and SDK spans using every attribute type, events, links and scopes."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from serving.telemetry.otlp_wire import encode_request
from serving.telemetry.tracing import Tracing, TracingConfig

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Keep(SpanExporter):
  def __init__(self):
    self.spans = []

  def export(self, spans):
    self.spans.extend(spans)
    return SpanExportResult.SUCCESS


def _server_spans(keep: _Keep) -> Tracing:
  tracing = Tracing(TracingConfig(rate=1.0, otlp_endpoint="127.0.0.1:1"), exporter=keep)
  now = time.perf_counter()
  headers = {"traceparent": PARENT, "tracestate": "vendor=x,other=y"}
  python_req = tracing.start("ModelInfer m", headers.get, now)
  python_req.submitted("m", 3, 4)
  natives = [("ModelInfer m", PARENT, "k=v", "id-1", 2, now, now + 1e-4, 0.0),
             ("POST /v2/models/m/infer", "", "", "", 1, now, now + 2e-4, 0.0)]
  tracing.batch(model="m", version="3", bucket=8, rows=7, traces=[python_req],
                t_taken=now + 3e-4, t_dispatch=now + 4e-4, t_done=now + 9e-4, natives=natives,
                t_sent=now + 1e-3)
  python_req.answered()
  tracing.finish(python_req, attributes={"xlaserve.code": "INVALID_ARGUMENT"}, error="bad input")
  return tracing


def _sdk_spans(tracing: Tracing) -> None:
  tracer = tracing.provider.get_tracer("another.scope", "1.2", schema_url="https://x/s")
  link = otel.Link(otel.SpanContext(7, 9, True, otel.TraceFlags(1)), {"why": "because"})
  with tracer.start_as_current_span("everything", links=[link], attributes={
      "b": True, "f": -1.5, "i": -(2**40), "big": 2**62, "s": "é ✓", "ls": ["a", "b"],
      "li": [1, 2, 3], "lb": [True, False], "lf": [0.25], "long": "x" * 300}) as span:
    span.add_event("ev", {"n": 1}, timestamp=123)
    span.set_status(otel.Status(otel.StatusCode.OK))
    with tracer.start_as_current_span("child", kind=otel.SpanKind.CLIENT):
      pass


def test_same_request_as_the_sdk_encoder():
  keep = _Keep()
  tracing = _server_spans(keep)
  tracing.provider.add_span_processor(SimpleSpanProcessor(keep))
  _sdk_spans(tracing)
  tracing.provider.force_flush()
  names = {s.name for s in keep.spans}
  assert {"batch", "assemble", "parse", "queue", "compute", "encode", "everything",
          "child", "ModelInfer m", "POST /v2/models/m/infer"} <= names
  ours = ExportTraceServiceRequest.FromString(encode_request(keep.spans))
  assert ours == encode_spans(keep.spans)
  assert len([s for rs in ours.resource_spans for ss in rs.scope_spans for s in ss.spans]) == len(
      keep.spans)
  tracing.shutdown()


@pytest.mark.parametrize("value", [object(), {1, 2}])
def test_unencodable_attribute_names_its_type(value):
  span = ReadableSpan("odd", otel.SpanContext(1, 2, False, otel.TraceFlags(1)),
                      resource=Resource.create({}), attributes={"odd": value}, start_time=1,
                      end_time=2)
  with pytest.raises(TypeError, match=type(value).__name__):
    encode_request([span])
