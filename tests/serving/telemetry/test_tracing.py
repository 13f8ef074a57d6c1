"""OpenTelemetry tracing end to end: the real server (mock model) exports over OTLP/gRPC to a
receiver speaking the real OTLP protocol inside the test; tritonclient gRPC and HTTP clients
send W3C `traceparent`s. Checked: trace and parent ids are the client's, span names,
parentage, the batch span's links, timing (children inside parents, stages in order), what is
not sampled is not exported, and the queue and compute histograms on /metrics."""

from __future__ import annotations

import secrets
import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th

from clientutil import triton_inputs
from serving.frontend import native as native_frontend
from serving.telemetry.tracing import TracingConfig
from otlputil import INTERNAL, SERVER, otlp_receiver
from servingutil import expected, metric, mock_factory, mock_rows, serving, write_mock_bundle

NATIVE, _ = native_frontend.load_extension()
STATUS_ERROR = 2
STAGES = ("parse", "queue", "compute", "encode")


def _parent(trace_id: str, span_id: str, flags: str = "01") -> str:
  return f"00-{trace_id}-{span_id}-{flags}"


def _ids() -> tuple[str, str]:
  return secrets.token_hex(16), secrets.token_hex(8)


def _attrs(span) -> dict:
  out = {}
  for kv in span.attributes:
    v = kv.value
    out[kv.key] = (v.string_value if v.HasField("string_value") else
                   v.bool_value if v.HasField("bool_value") else v.int_value)
  return out


def _grpc_infer(address: str, x, k, headers=None):
  with tg.InferenceServerClient(address) as c:
    res = c.infer("mock", triton_inputs({"x": x, "k": k}), headers=headers)
    return res.as_numpy("y"), res.as_numpy("z")


def _http_infer(port: int, x, k, headers=None, binary=True):
  ins = []
  for name, arr in (("x", x), ("k", k)):
    i = th.InferInput(name, list(arr.shape), th.np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr, binary_data=binary)
    ins.append(i)
  outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("y", "z")]
  with th.InferenceServerClient(f"127.0.0.1:{port}") as c:
    res = c.infer("mock", ins, outputs=outs, headers=headers)
    return res.as_numpy("y"), res.as_numpy("z")


def _check_answer(got, x, k) -> None:
  y, z = expected(x, k)
  np.testing.assert_array_equal(got[0], y)
  np.testing.assert_array_equal(got[1], z)


def _request_trace(spans, trace_id: str, parent_id: str | None, name: str) -> dict:
  """The request span of `trace_id` (checked: SERVER kind, name, parent) and its stage
  children (checked: names, parentage, nested in it and in order)."""
  mine = [s for s in spans if s.trace_id.hex() == trace_id]
  roots = [s for s in mine if s.kind == SERVER]
  assert len(roots) == 1, [s.name for s in mine]
  req = roots[0]
  assert req.name == name
  assert req.parent_span_id.hex() == (parent_id or ""), "parent must be the client's span"
  children = {s.name: s for s in mine if s is not req}
  assert sorted(children) == sorted(STAGES), sorted(children)
  for c in children.values():
    assert c.parent_span_id == req.span_id
    assert req.start_time_unix_nano <= c.start_time_unix_nano <= c.end_time_unix_nano
    assert c.end_time_unix_nano <= req.end_time_unix_nano
  ends = [(children[n].start_time_unix_nano, children[n].end_time_unix_nano) for n in STAGES]
  for (_, end), (start, _) in zip(ends, ends[1:]):
    assert end <= start, "parse, queue, compute, encode follow one another"
  return {"request": req, **children}


def _batch_of(spans, request_span) -> dict:
  """The batch span linked to `request_span` and its children, checked against it."""
  batches = [s for s in spans if s.name == "batch" and any(
      l.span_id == request_span.span_id and l.trace_id == request_span.trace_id
      for l in s.links)]
  assert len(batches) == 1
  batch = batches[0]
  assert batch.kind == INTERNAL and batch.trace_id != request_span.trace_id
  kids = {s.name: s for s in spans if s.parent_span_id == batch.span_id}
  assert sorted(kids) == ["assemble", "compute"]
  assert (batch.start_time_unix_nano == kids["assemble"].start_time_unix_nano
          <= kids["assemble"].end_time_unix_nano == kids["compute"].start_time_unix_nano
          <= kids["compute"].end_time_unix_nano == batch.end_time_unix_nano)
  return {"batch": batch, **kids}


def _check_request(spans, trace_id, parent_id, name, rows, native=False) -> None:
  t = _request_trace(spans, trace_id, parent_id, name)
  a = _attrs(t["request"])
  assert bool(a.get("xlaserve.native")) == native  # answered by the C++ queue
  assert (a["xlaserve.model"], a["xlaserve.version"], a["xlaserve.rows"]) == ("mock", "1", rows)
  assert a["xlaserve.code"] == "OK" and a["xlaserve.request_id"]
  b = _batch_of(spans, t["request"])
  ba = _attrs(b["batch"])
  assert ba["xlaserve.model"] == "mock" and ba["xlaserve.rows"] >= rows
  assert ba["xlaserve.bucket"] >= ba["xlaserve.rows"]
  # the request's queue ends when its batch is taken, and its compute is the batch's span
  assert t["queue"].end_time_unix_nano == b["batch"].start_time_unix_nano
  assert t["compute"].start_time_unix_nano == b["batch"].start_time_unix_nano
  assert t["compute"].end_time_unix_nano == b["batch"].end_time_unix_nano


@pytest.fixture
def fast_export(monkeypatch):
  monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the SDK's batch export delay (ms)


@pytest.mark.skipif(NATIVE is None, reason="native front end not built")
def test_client_traceparent_is_traced_through_the_native_front_ends(tmp_path, fast_export):
  """Rate 0: only client-sampled requests are traced, on the C++ fast path (spans from its
  timestamps) or, for what C++ relays (JSON tensors), by Python told the decision; nothing
  else is exported; the histograms count every request."""
  write_mock_bundle(tmp_path / "repo")
  rng = np.random.default_rng(0)
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint, service_name="tracing-test")
    with serving(tmp_path / "repo", mock_factory(), http_port=0, metrics_port=0,
                 tracing=cfg) as bg:
      srv = bg.server
      assert (srv.frontend, srv.http_frontend) == ("native", "native")
      (g_tid, g_sid), (h_tid, h_sid), (u_tid, u_sid) = _ids(), _ids(), _ids()
      j_tid, j_sid = _ids()
      x, k = mock_rows(rng, 3)
      before = srv.native.stats()
      _check_answer(_grpc_infer(bg.address, x, k, {"traceparent": _parent(g_tid, g_sid)}), x, k)
      _check_answer(_http_infer(srv.http_port, x, k, {"traceparent": _parent(h_tid, h_sid)}),
                    x, k)
      _check_answer(_http_infer(srv.http_port, x, k, {"traceparent": _parent(j_tid, j_sid)},
                                binary=False), x, k)
      untraced = [None, {"traceparent": _parent(u_tid, u_sid, "00")},  # not sampled by client
                  {"traceparent": "00-xyz-0-01"},  # malformed: ignored
                  {"x-xlaserve-trace": "1"}]  # a client cannot pass as the native relay
      for headers in untraced:
        _check_answer(_grpc_infer(bg.address, x, k, headers), x, k)
      _check_answer(_http_infer(srv.http_port, x, k, {"x-xlaserve-trace": "1"}), x, k)
      after = srv.native.stats()
      assert after["relayed"] - before["relayed"] == 0  # traced or not: the C++ fast path
      assert after["http_relayed"] - before["http_relayed"] == 1  # the JSON one
      assert after["fast"] - before["fast"] == 1 + len(untraced)
      assert after["http_fast"] - before["http_fast"] == 2
      text = urllib.request.urlopen(
          f"http://127.0.0.1:{srv.metrics_port}/metrics").read().decode()
    # the server stopped: its buffered spans were flushed
  spans = receiver.spans
  assert receiver.services == {"tracing-test"}
  _check_request(spans, g_tid, g_sid, "ModelInfer mock", 3, native=True)
  _check_request(spans, h_tid, h_sid, "POST /v2/models/mock/infer", 3, native=True)
  _check_request(spans, j_tid, j_sid, "POST /v2/models/mock/infer", 3)
  servers = [s for s in spans if s.kind == SERVER]
  assert sorted(s.trace_id.hex() for s in servers) == sorted([g_tid, h_tid, j_tid])
  assert len(spans) == 3 * (1 + len(STAGES)) + 3 * 3  # nothing else: 3 requests, 3 batches
  n = 3 + len(untraced) + 1
  labels = {"model": "mock", "version": "1"}
  assert metric(text, "xlaserve_queue_duration_seconds_count", **labels) == n
  assert metric(text, "xlaserve_compute_duration_seconds_count", **labels) == metric(
      text, "nv_inference_exec_count", **labels) >= 1
  assert metric(text, "xlaserve_compute_duration_seconds_sum", **labels) > 0


def test_python_front_ends_rate_one_roots_and_errors(tmp_path, fast_export):
  """Rate 1 on the Python front ends: requests without (or with a malformed) traceparent are
  new roots, a failed request's span has the ERROR status, a client's unsampled traceparent
  is honoured."""
  write_mock_bundle(tmp_path / "repo")
  rng = np.random.default_rng(1)
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=1.0, otlp_endpoint=endpoint)
    with serving(tmp_path / "repo", mock_factory(), http_port=0, frontend="python",
                 http_frontend="python", tracing=cfg) as bg:
      x, k = mock_rows(rng, 2)
      bad = "00-" + "0" * 32 + "-" + "1" * 16 + "-01"  # all-zero trace id: invalid
      _check_answer(_grpc_infer(bg.address, x, k, {"traceparent": bad}), x, k)
      _check_answer(_http_infer(bg.server.http_port, x, k), x, k)
      u_tid, u_sid = _ids()
      _check_answer(_grpc_infer(bg.address, x, k, {"traceparent": _parent(u_tid, u_sid, "00")}),
                    x, k)
      with pytest.raises(Exception, match="k"):  # k has 1 column: a shape error
        _grpc_infer(bg.address, x, np.zeros((2, 3), np.int32))
  spans = receiver.spans
  servers = {s.name: s for s in spans if s.kind == SERVER and s.status.code != STATUS_ERROR}
  assert sorted(servers) == ["ModelInfer mock", "POST /v2/models/mock/infer"]
  for name, s in servers.items():
    assert s.trace_id.hex() != "0" * 32 and not s.parent_span_id
    _check_request(spans, s.trace_id.hex(), None, name, 2)
  assert not [s for s in spans if s.trace_id.hex() == u_tid]
  failed = [s for s in spans if s.kind == SERVER and s.status.code == STATUS_ERROR]
  assert len(failed) == 1 and "k" in failed[0].status.message
  assert _attrs(failed[0])["xlaserve.code"] == "INVALID_ARGUMENT"
  kids = [s.name for s in spans if s.parent_span_id == failed[0].span_id]
  assert kids == ["parse"]  # it never reached a queue


@pytest.mark.skipif(NATIVE is None, reason="native front end not built")
def test_native_head_sampling_at_rate_one(tmp_path, fast_export):
  """Rate 1 behind the native front ends: C++ samples every request without a client decision
  and they are traced as roots, on the fast path; an unsampled client traceparent is not."""
  write_mock_bundle(tmp_path / "repo")
  rng = np.random.default_rng(2)
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=1.0, otlp_endpoint=endpoint)
    with serving(tmp_path / "repo", mock_factory(), http_port=0, tracing=cfg) as bg:
      x, k = mock_rows(rng, 1)
      before = bg.server.native.stats()
      _check_answer(_grpc_infer(bg.address, x, k), x, k)
      _check_answer(_http_infer(bg.server.http_port, x, k), x, k)
      u_tid, u_sid = _ids()
      _check_answer(_grpc_infer(bg.address, x, k, {"traceparent": _parent(u_tid, u_sid, "00")}),
                    x, k)
      after = bg.server.native.stats()
      assert after["fast"] - before["fast"] == 2 and after["http_fast"] - before["http_fast"] == 1
      assert (after["relayed"] - before["relayed"], after["http_relayed"]
              - before["http_relayed"]) == (0, 0)
  servers = {s.name: s for s in receiver.spans if s.kind == SERVER}
  assert sorted(servers) == ["ModelInfer mock", "POST /v2/models/mock/infer"]
  for name, s in servers.items():
    _check_request(receiver.spans, s.trace_id.hex(), None, name, 1, native=True)
  assert not [s for s in receiver.spans if s.trace_id.hex() == u_tid]


def _set_rate(port: int, body: bytes) -> tuple[int, dict]:
  req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/admin/tracing", data=body,
                               method="POST")
  try:
    with urllib.request.urlopen(req) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_the_sampling_rate_changes_while_serving(tmp_path, fast_export):
  """POST /v2/admin/tracing sets the rate for what follows, in C++ and Python alike: exactly
  the requests sent while it was 1 are traced."""
  write_mock_bundle(tmp_path / "repo")
  rng = np.random.default_rng(4)
  x, k = mock_rows(rng, 1)
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint)
    with serving(tmp_path / "repo", mock_factory(), http_port=0, tracing=cfg) as bg:
      port = bg.server.http_port
      for rate, calls in ((None, 2), (1, 3), (0, 2)):
        if rate is not None:
          assert _set_rate(port, json.dumps({"rate": rate}).encode()) == (200, {"rate": rate})
        for _ in range(calls):
          _check_answer(_grpc_infer(bg.address, x, k), x, k)
      status, body = _set_rate(port, b'{"rate": 2}')
      assert status == 400 and "R in [0, 1]" in body["error"]
  assert len([s for s in receiver.spans if s.kind == SERVER]) == 3
  write_mock_bundle(tmp_path / "plain")
  with serving(tmp_path / "plain", mock_factory(), http_port=0) as bg:  # tracing off
    status, body = _set_rate(bg.server.http_port, b'{"rate": 1}')
    assert status == 404 and "--otlp-endpoint" in body["error"]


def test_requests_on_a_stream_are_traced_each(tmp_path, fast_export):
  """ModelStreamInfer: each predict request on a stream is its own SERVER span, a child of
  the stream's traceparent, with the stage children and its batch span."""
  write_mock_bundle(tmp_path / "repo")
  rng = np.random.default_rng(5)
  tid, sid = _ids()
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint)
    with serving(tmp_path / "repo", mock_factory(), tracing=cfg) as bg:
      results: queue.Queue = queue.Queue()
      with tg.InferenceServerClient(bg.address) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)),
                       headers={"traceparent": _parent(tid, sid)})
        sent = [mock_rows(rng, n) for n in (1, 2, 3)]
        for i, (x, k) in enumerate(sent):
          c.async_stream_infer("mock", triton_inputs({"x": x, "k": k}), request_id=str(i))
        got = {}
        for _ in sent:
          result, error = results.get(timeout=30)
          assert error is None, error
          got[int(result.get_response().id)] = (result.as_numpy("y"), result.as_numpy("z"))
        c.stop_stream()
      for i, (x, k) in enumerate(sent):
        _check_answer(got[i], x, k)
  servers = [s for s in receiver.spans if s.kind == SERVER]
  assert len(servers) == 3 and {s.trace_id.hex() for s in servers} == {tid}
  assert sorted(_attrs(s)["xlaserve.rows"] for s in servers) == [1, 2, 3]
  for s in servers:
    assert s.name == "ModelStreamInfer mock" and s.parent_span_id.hex() == sid
    kids = {c.name: c for c in receiver.spans if c.parent_span_id == s.span_id}
    assert sorted(kids) == sorted(STAGES)
    _batch_of(receiver.spans, s)


def _chunked_infer(port: int, x, k, headers: dict) -> dict:
  """A JSON ModelInfer with a chunked body: the native HTTP server tunnels such a connection to
  Python unparsed, so the client's own headers reach it."""
  import http.client

  body = json.dumps({"inputs": [
      {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()},
      {"name": "k", "shape": list(k.shape), "datatype": "INT32", "data": k.ravel().tolist()}]})
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  try:
    conn.request("POST", "/v2/models/mock/infer", body=iter([body.encode()]),
                 headers={"Content-Type": "application/json", **headers}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return {o["name"]: np.array(o["data"]).reshape(o["shape"])
            for o in json.loads(resp.read())["outputs"]}
  finally:
    conn.close()


@pytest.mark.skipif(NATIVE is None, reason="native front end not built")
def test_a_client_cannot_forge_the_relay_trace_mark_on_a_tunnelled_connection(tmp_path,
                                                                               fast_export):
  """Rate 0: a tunnelled request that marks itself sampled ("1", or a mark with a wrong
  secret) is not traced; a client-sampled traceparent on the same path still is."""
  write_mock_bundle(tmp_path / "repo")
  x, k = mock_rows(np.random.default_rng(3), 2)
  y, z = expected(x, k)
  with otlp_receiver() as (receiver, endpoint):
    cfg = TracingConfig(rate=0.0, otlp_endpoint=endpoint, service_name="forge-test")
    with serving(tmp_path / "repo", mock_factory(), http_port=0, tracing=cfg) as bg:
      srv = bg.server
      assert srv.http_frontend == "native"
      tunnels = srv.native.stats()["http_tunnels"]
      forged = [{"x-xlaserve-trace": "1"}, {"x-xlaserve-trace": "0" * 32 + " 1"},
                {"x-xlaserve-trace": "1 1"}]
      for headers in forged:
        got = _chunked_infer(srv.http_port, x, k, headers)
        np.testing.assert_array_equal(got["y"], y)
        np.testing.assert_array_equal(got["z"], z)
      tid, sid = _ids()
      _chunked_infer(srv.http_port, x, k, {"traceparent": _parent(tid, sid)})
      assert srv.native.stats()["http_tunnels"] == tunnels + len(forged) + 1
  servers = [s for s in receiver.spans if s.kind == SERVER]
  assert [s.trace_id.hex() for s in servers] == [tid]  # only the client-sampled one
