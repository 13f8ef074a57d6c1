"""Generations are traced: a stream's generation is one SERVER span (child of the stream's
traceparent) whose `queue`, `prefill` and `decode` children follow one another inside it, with
its token counts; an OpenAI-API request is one span over its choices; exported over OTLP/gRPC
to a receiver inside the test."""

from __future__ import annotations

import json
import queue
import secrets
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import serving, triton_inputs
from models.tokenizer import ByteTokenizer
from otlputil import SERVER, otlp_receiver
from serving.telemetry.tracing import TracingConfig


def _attrs(span) -> dict:
  return {kv.key: (kv.value.string_value if kv.value.HasField("string_value")
                   else kv.value.int_value) for kv in span.attributes}


@pytest.fixture(scope="module")
def traced_lm(tiny_bundle):
  """(server, receiver): the tiny LM served with tracing on (rate 0: clients decide)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the SDK's export delay (ms)
    with otlp_receiver() as (receiver, endpoint):
      cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint)
      with serving(tiny_bundle.parent.parent, tracing=cfg, http_port=0) as bg:
        yield bg, receiver


def _server_span(receiver, trace_id: str):
  """The one SERVER span of `trace_id`, once exported (the SDK exports every 50 ms here)."""
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    spans = [s for s in receiver.spans if s.kind == SERVER and s.trace_id.hex() == trace_id]
    if spans and any(s.parent_span_id == spans[0].span_id and s.name == "decode"
                     for s in receiver.spans):
      assert len(spans) == 1
      return spans[0]
    time.sleep(0.05)
  raise AssertionError(f"no span of trace {trace_id} exported")


def test_a_streamed_generation_is_one_span_with_its_phases(traced_lm):
  bg, receiver = traced_lm
  tid, sid = secrets.token_hex(16), secrets.token_hex(8)
  prompt = "Acme shoes:"
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
  span = _server_span(receiver, tid)
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


def test_http_generate_stream_is_traced_as_a_generation(traced_lm):
  """POST .../generate_stream with a traceparent header: one SERVER span with the phases."""
  bg, receiver = traced_lm
  tid, sid = secrets.token_hex(16), secrets.token_hex(8)
  body = json.dumps({"text_input": "Acme shoes:",
                     "parameters": {"max_tokens": 5, "ignore_eos": True}}).encode()
  req = urllib.request.Request(
      f"http://127.0.0.1:{bg.server.http_port}/v2/models/decoder/generate_stream",
      data=body, headers={"traceparent": f"00-{tid}-{sid}-01",
                          "content-type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    events = [json.loads(line[5:]) for line in r.read().decode().splitlines()
              if line.startswith("data:")]
  assert len("".join(e["text_output"] for e in events).encode()) == 5
  span = _server_span(receiver, tid)
  assert span.name == "POST /v2/models/decoder/generate_stream"
  assert (span.trace_id.hex(), span.parent_span_id.hex()) == (tid, sid)
  assert _attrs(span)["xlaserve.generated_tokens"] == 5
  kids = sorted(s.name for s in receiver.spans if s.parent_span_id == span.span_id)
  assert kids == sorted(["parse", "queue", "prefill", "decode"])


def _openai(bg, path: str, body: dict, traceparent: str) -> tuple[int, bytes]:
  req = urllib.request.Request(f"http://127.0.0.1:{bg.server.http_port}{path}",
                               data=json.dumps(body).encode(),
                               headers={"traceparent": traceparent,
                                        "content-type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, r.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def _only_server_span(receiver, trace_id: str):
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    spans = [s for s in receiver.spans if s.kind == SERVER and s.trace_id.hex() == trace_id]
    if spans:
      time.sleep(0.2)  # its children are exported in the same batch or the next
      assert len(spans) == 1
      return spans[0]
    time.sleep(0.05)
  raise AssertionError(f"no span of trace {trace_id} exported")


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_completion_is_one_span_over_its_choices(traced_lm, stream):
  """POST /v1/completions with n=2: one SERVER span, its token counts and finish reasons those
  of the answer the client got, the generation phases as children."""
  bg, receiver = traced_lm
  tid, sid = secrets.token_hex(16), secrets.token_hex(8)
  body = {"model": "decoder", "prompt": "Acme shoes:", "max_tokens": 4, "n": 2,
          "ignore_eos": True, "stream": stream,
          **({"stream_options": {"include_usage": True}} if stream else {})}
  status, raw = _openai(bg, "/v1/completions", body, f"00-{tid}-{sid}-01")
  assert status == 200
  if stream:
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines()
              if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    finishes = {c["index"]: c["finish_reason"] for ch in chunks for c in ch["choices"]
                if c.get("finish_reason")}
  else:
    answer = json.loads(raw)
    usage = answer["usage"]
    finishes = {c["index"]: c["finish_reason"] for c in answer["choices"]}
  span = _server_span(receiver, tid)
  assert span.name == "POST /v1/completions"
  assert (span.trace_id.hex(), span.parent_span_id.hex()) == (tid, sid)
  a = _attrs(span)
  assert a["xlaserve.generated_tokens"] == usage["completion_tokens"] == 8
  assert a["xlaserve.prompt_tokens"] == usage["prompt_tokens"]
  assert a["xlaserve.finish_reason"] == ",".join(finishes[i] for i in range(2))
  assert (a["xlaserve.choices"], a["http.response.status_code"], a["xlaserve.code"],
          a["xlaserve.model"]) == (2, 200, "OK", "decoder")
  kids = sorted(s.name for s in receiver.spans if s.parent_span_id == span.span_id)
  assert kids == sorted(["parse", "queue", "prefill", "decode"])


def test_a_refused_openai_request_ends_its_span_with_the_status(traced_lm):
  bg, receiver = traced_lm
  tid = secrets.token_hex(16)
  status, raw = _openai(bg, "/v1/completions", {"model": "nope", "prompt": "x"},
                        f"00-{tid}-{secrets.token_hex(8)}-01")
  assert status == 404
  span = _only_server_span(receiver, tid)
  a = _attrs(span)
  assert (a["http.response.status_code"], a["xlaserve.code"]) == (404, "NOT_FOUND")
  assert span.status.message == json.loads(raw)["error"]["message"]
