"""Generations are traced: a stream's generation is one SERVER span (child of the stream's
traceparent) whose `queue`, `prefill` and `decode` children follow one another inside it, with
its token counts; exported over OTLP/gRPC to a receiver inside the test."""

from __future__ import annotations

import queue
import secrets

import numpy as np
import tritonclient.grpc as tc

from clientutil import serving, triton_inputs
from models.tokenizer import ByteTokenizer
from otlputil import SERVER, otlp_receiver
from serving.telemetry.tracing import TracingConfig


def _attrs(span) -> dict:
  return {kv.key: (kv.value.string_value if kv.value.HasField("string_value")
                   else kv.value.int_value) for kv in span.attributes}


def test_a_streamed_generation_is_one_span_with_its_phases(tiny_bundle, monkeypatch):
  monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
  tid, sid = secrets.token_hex(16), secrets.token_hex(8)
  prompt = "Acme shoes:"
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint)
    with serving(tiny_bundle.parent.parent, tracing=cfg) as bg:
      results: queue.Queue = queue.Queue()
      c = tc.InferenceServerClient(bg.address)
      c.start_stream(callback=lambda result, error: results.put((result, error)),
                     headers={"traceparent": f"00-{tid}-{sid}-01"})
      try:
        c.async_stream_infer("decoder", triton_inputs(
            {"text_input": np.array([prompt.encode()], dtype=object)}), request_id="g",
            parameters={"max_tokens": 9, "ignore_eos": True})
        pieces, final = [], False
        while not final:
          result, error = results.get(timeout=60)
          assert error is None, error
          out = result.as_numpy("text_output")
          pieces += [] if out is None else [out[0]]
          final = result.get_response().parameters["triton_final_response"].bool_param
      finally:
        c.stop_stream()
  (span,) = [s for s in receiver.spans if s.kind == SERVER]
  assert span.name == "ModelStreamInfer decoder"
  assert (span.trace_id.hex(), span.parent_span_id.hex()) == (tid, sid)
  a = _attrs(span)
  assert a["xlaserve.generated_tokens"] == 9 == len(b"".join(pieces))  # bytes are tokens
  assert a["xlaserve.prompt_tokens"] == len(ByteTokenizer().encode(prompt))
  assert (a["xlaserve.finish_reason"], a["xlaserve.code"], a["xlaserve.model"]) == (
      "length", "OK", "decoder")
  kids = {s.name: s for s in receiver.spans if s.parent_span_id == span.span_id}
  order = ["parse", "queue", "prefill", "decode"]
  assert sorted(kids) == sorted(order)
  times = [(kids[n].start_time_unix_nano, kids[n].end_time_unix_nano) for n in order]
  assert span.start_time_unix_nano <= times[0][0]
  for (s0, e0), (s1, _) in zip(times, times[1:]):
    assert s0 <= e0 <= s1, "the phases follow one another"
  assert times[-1][1] <= span.end_time_unix_nano
  assert times[-1][1] > times[-1][0]  # 8 decode steps take time
