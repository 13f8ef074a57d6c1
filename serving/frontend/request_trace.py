"""How the Python front ends start and end a request's trace (serving/telemetry/tracing.py):
the W3C trace context and the native relay's head decision read from gRPC metadata or HTTP
headers, and the span's final attributes (request id, status) in each protocol's terms."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from serving.telemetry.tracing import RequestTrace, Tracing
from serving.types import GRPC_STATUS, ServingError


def start_grpc(tracing: Tracing, context: Any, model: str, t0: float,
               trusted_marker: bool, method: str = "ModelInfer") -> RequestTrace | None:
  """A ModelInfer's (or a stream's request's: `method`) trace (None: not sampled), from the
  call's invocation metadata."""
  metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
  return tracing.start(f"{method} {model}", metadata.get, t0, trusted_marker=trusted_marker)


def start_http(tracing: Tracing, headers: Mapping[bytes, bytes], path: str, t0: float,
               marker_secret: str | None) -> RequestTrace | None:
  """An HTTP inference request's trace (None: not sampled), from its headers; behind the
  native HTTP server its mark holds when it carries `marker_secret`."""

  def get(key: str) -> str | None:
    v = headers.get(key.encode())
    return None if v is None else v.decode("latin-1")

  return tracing.start(f"POST {path}", get, t0, marker_secret=marker_secret)


def finish_grpc(tracing: Tracing, rt: RequestTrace, request_id: str,
                err: ServingError | None) -> None:
  """Ends a ModelInfer's span with its request id and gRPC status."""
  tracing.finish(rt, attributes={
      "xlaserve.request_id": request_id, "xlaserve.code": "OK" if err is None else err.code.value,
      "rpc.grpc.status_code": 0 if err is None else GRPC_STATUS[err.code]},
      error=None if err is None else err.message)


def finish_http(tracing: Tracing, rt: RequestTrace, request_id: str, status: int,
                err: ServingError | None) -> None:
  """Ends an HTTP inference request's span with its request id and HTTP status."""
  tracing.finish(rt, attributes={
      "xlaserve.request_id": request_id, "xlaserve.code": "OK" if err is None else err.code.value,
      "http.response.status_code": status}, error=None if err is None else err.message)


def finish_generation(tracing: Tracing, rt: RequestTrace, request_id: str, event: Any) -> None:
  """Ends a generation's span from its final event (tokens, timings, finish reason, error)."""
  m = event.metrics
  attributes = {"xlaserve.request_id": request_id,
                "xlaserve.code": "OK" if event.error is None else event.error.code.value,
                "xlaserve.finish_reason": str(getattr(event.finish_reason, "value",
                                                      event.finish_reason))}
  if m is not None:
    attributes.update({"xlaserve.prompt_tokens": m.prompt_tokens,
                       "xlaserve.generated_tokens": m.generated_tokens,
                       "xlaserve.preemptions": m.preemptions})
  tracing.finish_generation(
      rt, attributes=attributes, queue_s=None if m is None else m.queue_s,
      ttft_s=None if m is None else m.ttft_s,
      error=None if event.error is None else event.error.message)


# An OpenAI-API error's HTTP status as the code the other protocols' spans carry.
OPENAI_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "INVALID_ARGUMENT",
                429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 503: "UNAVAILABLE"}


def finish_openai(tracing: Tracing, rt: RequestTrace, request_id: str, status: int,
                  error: str | None, metrics: Sequence[Any] = (),
                  finish_reasons: Sequence[str | None] = (),
                  usage: Mapping[str, int] | None = None) -> None:
  """Ends an OpenAI-API request's span over all its choices' generations (`metrics`: each
  one's final timings, None if it never finished): `queue` ends when the first got a decode
  slot, `prefill` at the first token of any, `decode` at the end; token counts from `usage`,
  finish reasons in choice order, the HTTP status and its code."""
  done = [m for m in metrics if m is not None]
  usage = usage or {}
  tracing.finish_generation(rt, attributes={
      "xlaserve.request_id": request_id, "xlaserve.code": OPENAI_CODES.get(status, "INTERNAL"),
      "http.response.status_code": status, "xlaserve.choices": len(metrics),
      "xlaserve.finish_reason": ",".join(r or "" for r in finish_reasons),
      "xlaserve.prompt_tokens": usage.get("prompt_tokens", 0),
      "xlaserve.generated_tokens": usage.get("completion_tokens", 0)},
      queue_s=min((m.queue_s for m in done if m.queue_s is not None), default=None),
      ttft_s=min((m.ttft_s for m in done if m.ttft_s is not None), default=None), error=error)
