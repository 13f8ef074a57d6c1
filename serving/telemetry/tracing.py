"""OpenTelemetry tracing of inference requests and batches, recorded after the fact.

Each server builds its own TracerProvider (never the global one) exporting over OTLP/gRPC.
A request's head decision is taken once, before any span object exists: a client's W3C
`traceparent` decides (parent-based), else one random draw against the rate, made here or,
with the native front ends, in C++ (serving/frontend/native/trace.cc; what C++ relays carries
the decision as `x-xlaserve-trace: 1|0`). Unsampled requests cost that draw and nothing more.
A sampled Python request carries a `RequestTrace` (its SERVER span and a few perf_counter
floats); a sampled request the native queue answers stays on the C++ fast path and comes back
with its batch as a record of timestamps. The runner hands each batch holding traced requests
to `Tracing.batch`, which records ONE `batch` span (children `assemble`, `compute`) linked to
every traced request in it; request spans get children `parse`, `queue`, `compute`, `encode`,
all with explicit timestamps converted from the monotonic clock to epoch ns once.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import random
import time
from typing import Any, Callable, Sequence

from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (Decision, ParentBased, Sampler, SamplingResult,
                                              TraceIdRatioBased)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serving.telemetry.otlp_wire import WireSpanExporter

logger = logging.getLogger(__name__)

# The relay's head decision for a request (gRPC metadata key and HTTP header, "1" or "0"),
# trusted only where the Python front end listens behind the native one.
TRACE_MARKER = "x-xlaserve-trace"
_HEAD = "xlaserve.head_sampled"  # span-start attribute the sampler honours, then drops
_SAMPLED = otel.TraceFlags(otel.TraceFlags.SAMPLED)


@dataclasses.dataclass(frozen=True, slots=True)
class TracingConfig:
  """Tracing settings: `rate` of requests without a client decision sampled (0..1), the OTLP
  collector's host:port (None: tracing off), and the `service.name` resource."""

  rate: float = 0.0
  otlp_endpoint: str | None = None
  service_name: str = "xlaserve"

  def __post_init__(self):
    if not 0.0 <= self.rate <= 1.0:
      raise ValueError(f"trace rate must be in 0..1, got {self.rate}")
    if self.rate > 0 and self.otlp_endpoint is None:
      raise ValueError("a trace rate above 0 needs an OTLP endpoint (--otlp-endpoint host:port)")
    if self.otlp_endpoint is not None and ":" not in self.otlp_endpoint:
      raise ValueError(f"OTLP endpoint must be host:port, got {self.otlp_endpoint!r}")
    if not self.service_name:
      raise ValueError("service name must not be empty")

  @property
  def enabled(self) -> bool:
    return self.otlp_endpoint is not None


class _HeadSampler(Sampler):
  """ParentBased(TraceIdRatioBased(rate)), except that a span started with the `_HEAD`
  attribute (a head decision already taken: in C++, by one draw here, or a batch holding
  traced requests) is recorded; the attribute itself is not kept."""

  def __init__(self, rate: float):
    self._inner = ParentBased(TraceIdRatioBased(rate))

  def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None,
                    links=None, trace_state=None) -> SamplingResult:
    if attributes and attributes.get(_HEAD):
      kept = {k: v for k, v in attributes.items() if k != _HEAD}
      state = otel.get_current_span(parent_context).get_span_context().trace_state
      return SamplingResult(Decision.RECORD_AND_SAMPLE, kept, state)
    return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links,
                                     trace_state)

  def get_description(self) -> str:
    return f"HeadSampled{{{self._inner.get_description()}}}"


class RequestTrace:
  """One sampled request: its SERVER span, the perf_counter times its stages ended at, and
  the attributes its span gets when it ends."""

  __slots__ = ("span", "t0", "t_submit", "t_taken", "t_done", "t_resume", "attributes")

  def __init__(self, span: Any, t0: float):
    self.span, self.t0 = span, t0
    self.t_submit = self.t_taken = self.t_done = self.t_resume = None
    self.attributes: dict[str, Any] = {}

  def submitted(self, model: str, version: int, rows: int) -> None:
    """Parsed and validated: it goes to `model` `version`'s queue now."""
    self.t_submit = time.perf_counter()
    self.attributes.update({"xlaserve.model": model, "xlaserve.version": str(version),
                            "xlaserve.rows": rows})

  def answered(self) -> None:
    """Its outputs reached the front end's event loop (encoding starts)."""
    self.t_resume = time.perf_counter()


def unseal_marker(mark: str, secret: str) -> str | None:
  """The decision ("1" or "0") of a relay mark "<secret> <decision>", or None when the mark is
  not the relay's (a client's forgery is ignored, as if absent)."""
  head, _, decision = mark.rpartition(" ")
  ok = hmac.compare_digest(head.encode(), secret.encode()) and decision in ("0", "1")
  return decision if ok else None


class Tracing:
  """A server's tracer: head decisions, the batch spans, the request spans; `shutdown` flushes."""

  def __init__(self, config: TracingConfig, *, exporter: Any = None):
    self.config = config
    self._rate = config.rate
    self.provider = TracerProvider(
        sampler=_HeadSampler(config.rate),
        resource=Resource.create({"service.name": config.service_name}))
    self._processor = BatchSpanProcessor(
        exporter or WireSpanExporter(endpoint=config.otlp_endpoint, insecure=True))
    self.provider.add_span_processor(self._processor)
    self._tracer = self.provider.get_tracer("xlaserve")
    self._scope = InstrumentationScope("xlaserve")
    self._ids = RandomIdGenerator()
    self._propagator = TraceContextTextMapPropagator()
    self._offset_ns = time.time_ns() - time.perf_counter_ns()  # monotonic -> epoch, once
    self._random = random.Random()
    self.rate_listeners: list[Callable[[float], None]] = []  # told of every `set_rate`

  @property
  def rate(self) -> float:
    """The share of requests without a client decision that are traced."""
    return self._rate

  def set_rate(self, rate: float) -> None:
    """Changes the sampling rate while serving (POST /v2/admin/tracing), here and for the
    `rate_listeners` (the native front ends' head decisions)."""
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"trace rate must be in 0..1, got {rate}")
    self._rate = rate
    for listener in self.rate_listeners:
      listener(rate)

  def _ns(self, t: float) -> int:
    return int(t * 1e9) + self._offset_ns

  def start(self, name: str, get: Callable[[str], str | None], t0: float, *,
            trusted_marker: bool = False, marker_secret: str | None = None
            ) -> RequestTrace | None:
    """The request's trace when it is sampled, else None: `get(key)` reads its metadata or
    headers (lower-case names); the native relay's marker decides when `trusted_marker`, or
    (HTTP, where tunnelled connections carry the client's own headers) when it carries
    `marker_secret`."""
    forced = False
    if trusted_marker or marker_secret:
      marker = get(TRACE_MARKER)
      if marker is not None and marker_secret:
        marker = unseal_marker(marker, marker_secret)
      if marker is not None:
        if marker != "1":
          return None
        forced = True
    ctx = None
    parent = get("traceparent")
    if parent:
      carrier = {"traceparent": parent}
      state = get("tracestate")
      if state:
        carrier["tracestate"] = state
      ctx = self._propagator.extract(carrier)
      sc = otel.get_current_span(ctx).get_span_context()
      if not sc.is_valid:
        ctx = None  # malformed: ignored, the request is a root like any other
      elif not sc.trace_flags.sampled and not forced:
        return None
    if ctx is None and not forced and (self._rate <= 0 or self._random.random() >= self._rate):
      return None
    span = self._tracer.start_span(name, context=ctx, kind=otel.SpanKind.SERVER,
                                   start_time=self._ns(t0), attributes={_HEAD: True})
    return RequestTrace(span, t0)

  def batch(self, *, model: str, version: str, bucket: int, rows: int,
            traces: Sequence[RequestTrace], t_taken: float, t_dispatch: float, t_done: float,
            natives: Sequence[tuple] = (), t_sent: float = 0.0) -> None:
    """One batch's span, linked to the traced requests in it (children `assemble` and
    `compute`); each Python request's trace learns when its rows were taken and done, and
    the native ones (records of requests the C++ queue answered, at `t_sent`) are recorded."""
    native = [self._native_request(n, model, version) for n in natives]
    links = [otel.Link(t.span.get_span_context()) for t in traces]
    links += [otel.Link(ctx) for ctx, _, _ in native]
    batch = self._context(None)
    for name, start, end in (("assemble", t_taken, t_dispatch), ("compute", t_dispatch, t_done)):
      self._child(name, batch, start, end)
    self._emit("batch", batch, None, self._ns(t_taken), self._ns(t_done), {
        "xlaserve.model": model, "xlaserve.version": version, "xlaserve.bucket": bucket,
        "xlaserve.rows": rows, "xlaserve.traced_requests": len(traces)}, links)
    for t in traces:  # a request split across batches spans from its first to its last
      t.t_taken = t_taken if t.t_taken is None else min(t.t_taken, t_taken)
      t.t_done = t_done if t.t_done is None else max(t.t_done, t_done)
    t_end = max(t_done, t_sent)
    for ctx, (parent, start_ns, arrival, attributes), name in native:
      # (a split one: its queue runs to its last batch)
      self._child("parse", ctx, None, arrival, start_ns=start_ns)
      self._child("queue", ctx, arrival, t_taken)
      self._child("compute", ctx, t_taken, t_done)
      self._child("encode", ctx, t_done, t_end)
      self._emit(name, ctx, parent, start_ns, self._ns(t_end), attributes, (),
                 otel.SpanKind.SERVER)

  def _native_request(self, record: tuple, model: str,
                      version: str) -> tuple[otel.SpanContext, tuple, str]:
    """The context of the SERVER span of a request the native queue answered (its client's
    parent span, if valid, and what the span records), from its record."""
    name, parent, state, request_id, rows, t_start, arrival, _ = record
    remote = None
    if parent:
      carrier = {"traceparent": parent, **({"tracestate": state} if state else {})}
      remote = otel.get_current_span(self._propagator.extract(carrier)).get_span_context()
      if not remote.is_valid:
        remote = None
    attributes = {"xlaserve.model": model, "xlaserve.version": version, "xlaserve.rows": rows,
                  "xlaserve.request_id": request_id, "xlaserve.code": "OK",
                  "xlaserve.native": True}
    return self._context(remote), (remote, self._ns(t_start), arrival, attributes), name

  def _context(self, parent: otel.SpanContext | None) -> otel.SpanContext:
    """A new sampled span's context: a child of `parent` (its trace and state), else a root."""
    if parent is None:
      return otel.SpanContext(self._ids.generate_trace_id(), self._ids.generate_span_id(), False,
                              _SAMPLED)
    return otel.SpanContext(parent.trace_id, self._ids.generate_span_id(), False, _SAMPLED,
                            parent.trace_state)

  def _emit(self, name: str, ctx: otel.SpanContext, parent: otel.SpanContext | None,
            start_ns: int, end_ns: int, attributes: dict[str, Any] | None = None,
            links: Sequence[otel.Link] = (), kind: otel.SpanKind = otel.SpanKind.INTERNAL) -> None:
    """Hands a finished span, built whole, to the exporter's processor. Spans whose whole
    life is known when they are recorded skip the tracer (its sampler and attribute checks:
    the head decision is taken), a tenth of what starting and ending one costs."""
    self._processor.on_end(ReadableSpan(
        name=name, context=ctx, parent=parent, resource=self.provider.resource, kind=kind,
        attributes=attributes, links=links, start_time=start_ns, end_time=max(start_ns, end_ns),
        instrumentation_scope=self._scope))

  def _child(self, name: str, parent: otel.SpanContext, start: float | None, end: float | None,
             *, start_ns: int | None = None) -> None:
    """A finished child span of `parent` (sampled already: its decision holds)."""
    if (start is None and start_ns is None) or end is None:
      return
    first = self._ns(start) if start_ns is None else start_ns
    self._emit(name, self._context(parent), parent, first, self._ns(end))

  def finish(self, rt: RequestTrace, *, attributes: dict[str, Any],
             error: str | None = None) -> None:
    """Ends the request span now with its stage children: parse (to the submit), queue (to
    its first batch), compute (to its last batch's end), encode (from the answer's arrival on
    the event loop); `error` sets the ERROR status."""
    t_end = time.perf_counter()
    span = rt.span
    ctx = span.get_span_context()
    self._child("parse", ctx, rt.t0, t_end if rt.t_submit is None else rt.t_submit)
    self._child("queue", ctx, rt.t_submit, rt.t_resume if rt.t_taken is None else rt.t_taken)
    self._child("compute", ctx, rt.t_taken, rt.t_done)
    self._child("encode", ctx, rt.t_resume, t_end)
    span.set_attributes({**rt.attributes, **attributes})
    if error is not None:
      span.set_status(otel.Status(otel.StatusCode.ERROR, error))
    span.end(end_time=self._ns(t_end))

  def finish_generation(self, rt: RequestTrace, *, attributes: dict[str, Any],
                        queue_s: float | None, ttft_s: float | None,
                        error: str | None = None) -> None:
    """Ends a generation's span now (a stream's request, or a generate call) with children
    `queue` (to its first decode slot), `prefill` (to its first token) and `decode` (to its
    last), from the generation's own timings, counted from its submit (`submitted`)."""
    t_end = time.perf_counter()
    base = rt.t0 if rt.t_submit is None else rt.t_submit
    t_admit = None if queue_s is None else base + queue_s
    t_first = None if ttft_s is None else base + ttft_s
    ctx = rt.span.get_span_context()
    self._child("parse", ctx, rt.t0, base)
    self._child("queue", ctx, base, t_admit)
    self._child("prefill", ctx, t_admit, t_first)
    self._child("decode", ctx, t_first, t_end)
    rt.span.set_attributes({**rt.attributes, **attributes})
    if error is not None:
      rt.span.set_status(otel.Status(otel.StatusCode.ERROR, error))
    rt.span.end(end_time=self._ns(t_end))

  def shutdown(self) -> None:
    """Exports what is buffered and stops the exporter (server stop)."""
    try:
      self.provider.shutdown()
    except Exception:  # a collector gone away must not fail the shutdown
      logger.exception("flushing traces failed")
