"""Queueing and overload against the real server: shedding, deadlines, priorities, and the counters
that report them (Prometheus metrics and Triton's ModelStatistics) on every path."""

from __future__ import annotations

import concurrent.futures
import os
import time

import grpc
import numpy as np
import pytest

from benchmarks.loadgen import build_request
from benchmarks.overload import overload
from serving.batching import Admission, BatchingConfig, Batcher, Pending
from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected, metric, mock_factory, mock_request, outputs, serving, \
    write_mock_bundle


def _rows(n, value=1.0):
  return np.full((n, 4), value, np.float32), np.ones((n, 1), np.int32)


def _send(stub, req):
  try:
    return stub.ModelInfer(req, timeout=30)
  except grpc.RpcError as e:
    return e


def test_short_overload_sheds_the_excess_and_admitted_requests_keep_their_deadline(tmp_path):
  """3x the sustainable rate for a few seconds (the quick form of benchmarks/overload.py)."""
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  engines = {}
  # Requests fill the largest bucket, as in benchmarks/overload.py: the model is the bottleneck.
  delay_s, rows, deadline_s, duration = 0.05, 8, 0.3, 4.0
  capacity = 8 / rows / delay_s  # one 8-row batch per 50 ms: 20 requests/s
  with serving(repo, mock_factory(engines, delay_s=delay_s)) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    x, k = _rows(rows)
    payload = build_request("mock", {"x": x, "k": k}, params={"timeout": int(deadline_s * 1e6)})
    fig = overload(bg.address, payload, rows=rows, capacity_rps=capacity, factor=3.0,
                   duration=duration, deadline_s=deadline_s, server_pid=os.getpid(),
                   grpc_deadline=False)
    # Stays up and answers.
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    np.testing.assert_array_equal(outputs(stub.ModelInfer(mock_request(x, k)))["y"],
                                  expected(x, k)[0])
    assert fig.other_errors == {}
    assert fig.shed > 0.4 * fig.offered  # two thirds of the load is excess
    assert fig.ok >= 0.7 * capacity * duration  # goodput holds up under overload
    assert fig.deadline_missed <= 0.01 * (fig.ok + fig.deadline_missed)
    assert fig.admitted_p99_ms <= deadline_s * 1e3
    assert fig.rss_growth_mb < 30
    # Every outcome is counted, on the server, exactly as the clients saw it.
    text = bg.server.metrics.exposition().decode()
    mv = {"model": "mock", "version": "1"}
    assert metric(text, "xlaserve_requests_shed_total", **mv) == fig.shed
    assert metric(text, "nv_inference_request_failure", reason="RESOURCE_EXHAUSTED",
                  **mv) == fig.shed
    assert metric(text, "xlaserve_deadline_exceeded_total", **mv) == fig.deadline_missed
    assert metric(text, "nv_inference_request_success", **mv) == fig.ok + 1
    st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mock")).model_stats[0]
    assert st.inference_stats.success.count == fig.ok + 1
    assert st.inference_stats.fail.count == fig.shed + fig.deadline_missed
    assert st.inference_count == rows * (fig.ok + 1)
    assert st.execution_count == len(engines[("mock", 1)].batches)
    assert sum(b.compute_infer.count for b in st.batch_stats) == st.execution_count
    assert metric(text, "xlaserve_queue_rows", **mv) == 0


def test_shed_and_deadline_paths_all_reach_the_counters(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"max_queue_requests": 2})
  with serving(repo, mock_factory(delay_s=0.3)) as bg, grpc.insecure_channel(bg.address) as ch, \
      concurrent.futures.ThreadPoolExecutor(4) as pool:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    mv = {"model": "mock", "version": "1"}

    def phase(*reqs):
      futs = []
      for r in reqs:
        futs.append(pool.submit(_send, stub, r))
        time.sleep(0.03)
      return [f.result() for f in futs]

    # 1. Queue bound in requests: the engine is busy, two wait, the third is refused.
    blocker, a, b, c = phase(*(mock_request(*_rows(n)) for n in (8, 1, 1, 1)))
    assert all(isinstance(r, pb.ModelInferResponse) for r in (blocker, a, b))
    assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue_requests" in c.details()
    # 2. Deadline passing in the queue (Triton's timeout parameter, in microseconds).
    _, late = phase(mock_request(*_rows(8)), mock_request(*_rows(1), timeout=50_000))
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # 3. A deadline the queue ahead cannot meet is refused at once, not left to expire.
    _, queued, hopeless = phase(mock_request(*_rows(8)), mock_request(*_rows(1)),
                                mock_request(*_rows(1), timeout=200_000))
    assert isinstance(queued, pb.ModelInferResponse)
    assert hopeless.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "overloaded" in hopeless.details()
    text = bg.server.metrics.exposition().decode()
    assert metric(text, "xlaserve_requests_shed_total", **mv) == 2
    assert metric(text, "nv_inference_request_failure", reason="RESOURCE_EXHAUSTED",
                  **mv) == 2
    assert metric(text, "xlaserve_deadline_exceeded_total", **mv) == 1
    assert metric(text, "nv_inference_request_failure", reason="DEADLINE_EXCEEDED",
                  **mv) == 1
    assert metric(text, "nv_inference_request_success", **mv) == 6
    assert metric(text, "xlaserve_queue_rows", **mv) == 0
    assert metric(text, "nv_inference_pending_request_count", **mv) == 0
    st = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mock")).model_stats[0]
    assert (st.inference_stats.success.count, st.inference_stats.fail.count) == (6, 3)


class RecordingEngine(MockEngine):
  """Remembers the first x value of every batch it runs (each request is tagged by its x)."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.tags = []

  def dispatch(self, *, bucket, inputs):
    self.tags.append(float(inputs["x"][0, 0]))
    return super().dispatch(bucket=bucket, inputs=inputs)


def test_high_priority_request_overtakes_queued_low_priority_ones(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  engines = {}

  def factory(path, manifest, cfg):
    engines["mock"] = RecordingEngine(buckets=manifest.batch_buckets, delay_s=0.15)
    return engines["mock"]

  with serving(repo, factory) as bg, grpc.insecure_channel(bg.address) as ch, \
      concurrent.futures.ThreadPoolExecutor(6) as pool:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    done = []

    def send(tag, **params):
      resp = stub.ModelInfer(mock_request(*_rows(8, tag), **params), timeout=30)
      done.append(tag)
      return resp

    sent = [(100.0, {})]  # occupies the engine while the others queue up
    sent += [(1.0, {"priority": 5}), (2.0, {"priority": 5}), (3.0, {}), (4.0, {"priority": 0})]
    sent += [(9.0, {"priority": 1})]  # arrives last, highest priority
    futs = []
    for tag, params in sent:
      futs.append(pool.submit(send, tag, **params))
      time.sleep(0.02)
    for (tag, _), f in zip(sent, futs):
      np.testing.assert_array_equal(outputs(f.result())["y"], np.full((8, 1), 8 * tag + 1))
  # Lower number runs first; FIFO within a level; no priority (or 0) is the lowest level.
  assert engines["mock"].tags == [100.0, 9.0, 1.0, 2.0, 3.0, 4.0]
  assert done.index(9.0) < done.index(1.0)


def test_model_default_timeout_applies_unless_the_request_sets_one(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"default_timeout_us": 50_000})
  with serving(repo, mock_factory(delay_s=0.3)) as bg, grpc.insecure_channel(bg.address) as ch, \
      concurrent.futures.ThreadPoolExecutor(3) as pool:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    futs = []
    for req in (mock_request(*_rows(8)), mock_request(*_rows(1)),
                mock_request(*_rows(1), timeout=0)):  # Triton: 0 = no timeout for this request
      futs.append(pool.submit(_send, stub, req))
      time.sleep(0.03)
    first, default, explicit = (f.result() for f in futs)
    # The first one started at once: a deadline only expires requests still queued.
    assert isinstance(first, pb.ModelInferResponse)
    assert default.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline passed while queued" in default.details()
    assert isinstance(explicit, pb.ModelInferResponse)


@pytest.mark.parametrize("frontend", ["python", "auto"])  # the Python queue; the native one
def test_a_deadline_expiring_without_a_queue_wait_bound_leaves_the_model_serving(tmp_path,
                                                                                 frontend):
  """max_queue_wait_ms 0 (unbounded): a request whose own deadline passes in the queue gets
  DEADLINE_EXCEEDED, and the model answers the next one (the Python runner thread once died
  here, building a shed message for a bound that does not exist)."""
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"max_queue_wait_ms": 0, "instance_count": 1})
  with serving(repo, mock_factory(delay_s=0.3), frontend=frontend) as bg, \
      grpc.insecure_channel(bg.address) as ch, concurrent.futures.ThreadPoolExecutor(2) as pool:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    busy = pool.submit(_send, stub, mock_request(*_rows(8)))  # runs 0.3 s
    time.sleep(0.05)
    late = pool.submit(_send, stub, mock_request(*_rows(1), timeout=50_000))
    assert late.result().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(busy.result(), pb.ModelInferResponse)
    x, k = _rows(3, 2.0)
    answer = stub.ModelInfer(mock_request(x, k), timeout=10)
    np.testing.assert_array_equal(outputs(answer)["y"], expected(x, k)[0])


# -- the admission rules themselves, worked by hand (no server) -------------------------------

def _batcher(**kw):
  kw.setdefault("deadline_headroom", 0.0)
  return Batcher(BatchingConfig(buckets=(1, 2, 4, 8), max_queue_delay_s=0.01,
                                dispatch_when_idle=False, **kw))


def test_max_queue_requests_bound():
  b = _batcher(max_queue_requests=2)
  b.add(Pending("a", 1, 0.0))
  b.add(Pending("b", 1, 0.0))
  with pytest.raises(Admission, match="max_queue_requests"):
    b.add(Pending("c", 1, 0.0))
  assert b.queued_requests == 2
  with pytest.raises(ValueError):
    BatchingConfig(max_queue_requests=0)


def test_deadline_aware_admission_uses_measured_full_batch_time():
  b = _batcher()
  b.add(Pending("ahead", 12, 0.0))
  b.add(Pending("no-deadline", 1, 0.0))  # nothing measured yet: admitted
  b.add(Pending("unmeasured", 1, 0.0, deadline=0.001))  # no estimate: admitted, may expire
  b.observe(2, 0.05)  # before a full batch ran, the largest bucket timed stands in
  assert b.estimated_wait_s(1, 0) == pytest.approx(0.2)
  b.observe(4, 9.0)  # once a full batch ran, only its time counts
  b.observe(8, 0.1)
  # 14 rows ahead + 1 = 2 full batches, plus the two the executor may hold: 0.4 s.
  assert b.estimated_wait_s(1, 0) == pytest.approx(0.4)
  b.add(Pending("fits", 1, 1.0, deadline=1.41))
  with pytest.raises(Admission, match="overloaded"):
    b.add(Pending("too-tight", 1, 1.0, deadline=1.3))
  # A higher priority only waits for rows at its level or above.
  assert b.estimated_wait_s(1, -1) is None
  b.add(Pending("urgent", 1, 1.0, deadline=1.01, priority=-1))
  # Batch times are smoothed, so one slow batch moves the estimate a fifth of the way:
  # 0.8 * 0.1 + 0.2 * 0.2 = 0.12 s per batch (not 0.2, the last one, nor 0.15, the mean).
  # 16 rows queued at priority 0 or above, + 1: three batches, plus the executor's two: 0.6 s.
  b.observe(8, 0.2)
  assert b.estimated_wait_s(1, 0) == pytest.approx(0.6)
  with pytest.raises(Admission, match="overloaded"):
    b.add(Pending("0.59 s left", 1, 2.0, deadline=2.59))  # 0.1 per batch would fit (0.5 s)
  b.add(Pending("0.61 s left", 1, 2.0, deadline=2.61))  # 0.2 (1.0 s) or 0.15 (0.75 s) would not
  # With headroom, the estimate must fit in the rest of the time left: 0.48 s <= 0.5 * 1.0 s.
  h = _batcher(deadline_headroom=0.5)
  h.add(Pending("ahead", 12, 0.0))
  h.observe(8, 0.12)
  h.add(Pending("fits", 1, 0.0, deadline=1.0))
  with pytest.raises(Admission, match="overloaded"):
    h.add(Pending("too-tight", 1, 0.0, deadline=0.9))
  with pytest.raises(ValueError):
    BatchingConfig(deadline_headroom=1.0)


def test_client_chosen_priorities_do_not_accumulate():
  """Every request with a new priority, each run at once: the batcher's memory stays flat (an
  empty level per priority ever seen would grow it by hundreds of bytes a request)."""
  import gc
  import tracemalloc

  b = _batcher()

  def serve(first, n):
    for i in range(first, first + n):
      b.add(Pending(i, 1, 0.0, priority=i))
      assert b.decide(1.0, idle=True).plan is not None
    gc.collect()

  serve(0, 1000)
  tracemalloc.start()
  try:
    before = tracemalloc.take_snapshot()
    serve(1000, 10_000)
    after = tracemalloc.take_snapshot()
  finally:
    tracemalloc.stop()
  grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
  assert grown < 100_000, grown  # 10,000 leftover levels: megabytes
  assert b.queued_rows == b.queued_requests == 0
  assert b.head_priority() is None and b.oldest_arrival() is None


def test_request_outcomes_are_logged_as_json_with_request_ids(tmp_path, caplog):
  import json
  import logging

  from serving.telemetry.logs import JsonFormatter

  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch, \
      caplog.at_level(logging.DEBUG, logger="serving.frontend.servicer"):
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    req = mock_request(*_rows(2))
    req.id = "req-42"
    stub.ModelInfer(req)
    bad = mock_request(*_rows(2), model="mock")
    bad.inputs[0].shape[:] = [2, 5]
    assert isinstance(_send(stub, bad), grpc.RpcError)
  records = [json.loads(JsonFormatter().format(r)) for r in caplog.records
             if r.name == "serving.frontend.servicer"]
  ok, failed = records[-2:]
  assert (ok["request_id"], ok["code"], ok["model"], ok["level"]) == ("req-42", "OK", "mock",
                                                                      "DEBUG")
  assert ok["latency_ms"] >= 0 and ok["ts"].endswith("+00:00")
  assert failed["code"] == "INVALID_ARGUMENT" and "shape [2, 5]" in failed["error"]
  assert failed["request_id"] and failed["request_id"] != "req-42"  # generated when none given
