"""OTLP trace export with spans encoded straight to protobuf wire bytes.

The OpenTelemetry exporter's encoder builds one protobuf object per field of every span and
hashes each span's resource through `json.dumps`: about 36 µs a span here, most of what a
traced request costs at saturation. `encode_request` writes the same ExportTraceServiceRequest
(opentelemetry/proto/trace/v1/trace.proto, field for field as the SDK's `encode_spans` fills
it; tests/serving/telemetry/test_otlp_wire.py compares the two) in a few µs a span, and
`WireSpanExporter` is the SDK's own OTLP/gRPC exporter (channel, retries, timeouts) handing
those bytes to it parsed once by protobuf's C parser.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Iterable, Mapping, Sequence

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan

_YIELD_EVERY = 16  # spans encoded between two releases of the GIL
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")
_FLAGS_HAS_REMOTE = 0x100  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE = 0x200  # SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# SDK SpanKind value -> field 6, OTLP SpanKind (SDK INTERNAL=0 is OTLP 1, ...)
_KIND = {k: bytes((0x30, k + 1)) for k in range(5)}


def _varint(n: int) -> bytes:
  if 0 <= n < 0x80:
    return _BYTE[n]
  if n < 0:
    n += 1 << 64  # int64 as two's complement, ten bytes
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


_BYTE = tuple(bytes((i,)) for i in range(128))


def _len(field: int, payload: bytes) -> bytes:
  """A length-delimited field (string, bytes, message); every field number here is < 16."""
  n = len(payload)
  return _BYTE[(field << 3) | 2] + (_BYTE[n] if n < 0x80 else _varint(n)) + payload


def _value(v: Any) -> bytes:
  """An AnyValue message's payload, as the SDK encodes each Python type."""
  if v is None:
    return b""
  if isinstance(v, bool):
    return b"\x10" + (b"\x01" if v else b"\x00")
  if isinstance(v, str):
    return _len(1, v.encode())
  if isinstance(v, int):
    return b"\x18" + _varint(v)
  if isinstance(v, float):
    return b"\x21" + _DOUBLE.pack(v)
  if isinstance(v, bytes):
    return _len(7, v)
  if isinstance(v, Mapping):
    return _len(6, b"".join(_len(1, _key_value(str(k), x)) for k, x in v.items()))
  if isinstance(v, Sequence):
    return _len(5, b"".join(_len(1, _value(x)) for x in v))
  raise TypeError(f"attribute value of type {type(v).__name__} cannot be exported: {v!r}")


def _key_value(key: str, v: Any) -> bytes:
  return _len(1, key.encode()) + _len(2, _value(v))


def _flags(ctx: Any) -> bytes:
  """A span's or link's fixed32 flags value: whether its parent (or linked) context is remote."""
  return _REMOTE if ctx is not None and ctx.is_remote else _LOCAL


_LOCAL = struct.pack("<I", _FLAGS_HAS_REMOTE)
_REMOTE = struct.pack("<I", _FLAGS_HAS_REMOTE | _FLAGS_REMOTE)


def _uint(field: int, n: int) -> bytes:
  return _BYTE[field << 3] + _varint(n) if n else b""


class _Encoder:
  """Encodes spans; keeps the bytes of attributes it has seen (a server repeats the same few:
  model, version, code), bounded."""

  def __init__(self, cache_size: int = 4096):
    self._kv: dict[tuple[int, str, Any], bytes] = {}
    self._cache_size = cache_size

  def attributes(self, field: int, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
      return b""
    out, kv = [], self._kv
    for k, v in attributes.items():
      key = (field, k, v) if isinstance(v, (str, int, float, bool)) else None
      got = kv.get(key) if key is not None else None
      if got is None:
        got = _len(field, _key_value(k, v))
        if key is not None:
          if len(kv) >= self._cache_size:
            kv.clear()
          kv[key] = got
      out.append(got)
    return b"".join(out)

  def span(self, s: ReadableSpan) -> bytes:
    """One Span message, field 2 of its ScopeSpans."""
    ctx, parent, attrs = s.context, s.parent, self.attributes
    out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08",
           ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
      out.append(_len(3, ",".join(f"{k}={v}" for k, v in ctx.trace_state.items()).encode()))
    if parent is not None:
      out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    out += (_len(5, s.name.encode()), _KIND[s.kind.value], b"\x39",
            _FIXED64.pack(s.start_time or 0), b"\x41", _FIXED64.pack(s.end_time or 0),
            attrs(9, s.attributes), _uint(10, s.dropped_attributes))
    for e in s.events:
      out.append(_len(11, b"\x09" + _FIXED64.pack(e.timestamp) + _len(2, e.name.encode())
                      + attrs(3, e.attributes) + _uint(4, e.dropped_attributes)))
    out.append(_uint(12, s.dropped_events))
    for link in s.links:
      lc = link.context
      out.append(_len(13, b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08"
                      + lc.span_id.to_bytes(8, "big") + attrs(4, link.attributes)
                      + _uint(5, link.dropped_attributes) + b"\x35" + _flags(lc)))
    out.append(_uint(14, s.dropped_links))
    status = s.status
    out += (_STATUS_UNSET if status.status_code.value == 0 and not status.description else _len(
        15, (_len(2, status.description.encode()) if status.description else b"")
        + _uint(3, status.status_code.value)), b"\x85\x01", _flags(parent))
    return _len(2, b"".join(out))

  def request(self, spans: Iterable[ReadableSpan]) -> bytes:
    """The serialized ExportTraceServiceRequest of `spans`, grouped by resource, then scope."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for i, s in enumerate(spans):  # grouped by identity: a server's spans share one resource
      if i % _YIELD_EVERY == _YIELD_EVERY - 1:
        time.sleep(0)  # lets the serving threads have the GIL: a batch encodes for milliseconds
      _, scopes = groups.setdefault(id(s.resource), (s.resource, {}))
      scopes.setdefault(id(s.instrumentation_scope), (s.instrumentation_scope, []))[1].append(
          self.span(s))
    out = []
    for resource, scopes in groups.values():
      body = [_len(1, self.attributes(1, resource.attributes))]
      for scope, encoded in scopes.values():
        schema = scope.schema_url if scope is not None and scope.schema_url else ""
        body.append(_len(2, _len(1, self._scope(scope)) + b"".join(encoded)
                         + (_len(3, schema.encode()) if schema else b"")))
      if resource.schema_url:
        body.append(_len(3, resource.schema_url.encode()))
      out.append(_len(1, b"".join(body)))
    return b"".join(out)

  def _scope(self, scope: Any) -> bytes:
    if scope is None:
      return b""
    return (_len(1, scope.name.encode()) if scope.name else b"") + (
        _len(2, scope.version.encode()) if scope.version else b"") + self.attributes(
            3, scope.attributes)


_STATUS_UNSET = b"\x7a\x00"  # field 15, an empty Status


def encode_request(spans: Iterable[ReadableSpan]) -> bytes:
  """The serialized ExportTraceServiceRequest of `spans` (a fresh encoder: no cache kept)."""
  return _Encoder().request(spans)


class WireSpanExporter(OTLPSpanExporter):
  """The SDK's OTLP/gRPC span exporter with `encode_request` in place of its encoder."""

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._encoder = _Encoder()  # only the export thread uses it

  def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(self._encoder.request(data))
