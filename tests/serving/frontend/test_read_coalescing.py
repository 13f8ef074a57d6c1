"""Read coalescing in the native gRPC front end under a latency target (native/cq_poll.cc):
after a wake that accepted two or more calls, its worker pauses for 2% of the tightest target
(at most 500 us) so later arrivals are read together. The interval follows the served models'
targets; under concurrent load every call is still answered exactly (the MockEngine's outputs
worked by hand) and pauses are taken; one request at a time never pauses."""

from __future__ import annotations

import concurrent.futures
import urllib.request

import grpc
import numpy as np
import pytest

from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import (expected, metric, mock_factory, mock_request, outputs, serving,
                         write_mock_bundle)

NATIVE, WHY = native_frontend.load_extension()
pytestmark = pytest.mark.skipif(NATIVE is None, reason=WHY)

INTERVAL = "xlaserve_native_read_coalesce_seconds"
PAUSES = "xlaserve_native_read_coalesce_pauses_total"


def scrape(bg) -> str:
  url = f"http://127.0.0.1:{bg.server.metrics_port}/metrics"
  return urllib.request.urlopen(url, timeout=10).read().decode()


@pytest.mark.parametrize("targets,interval", [
    ({"a": 10, "b": 50}, 200e-6),   # the tightest target rules: 2% of 10 ms
    ({"a": None, "b": 5}, 100e-6),  # a model without a target does not lower it
    ({"a": 100}, 500e-6),           # capped at 500 us
    ({"a": None}, 0.0)])            # no target anywhere: no pause
def test_the_interval_follows_the_tightest_latency_target(tmp_path, targets, interval):
  for name, ms in targets.items():
    write_mock_bundle(tmp_path, name, 1, config={"latency_slo_ms": ms} if ms else {})
  with serving(tmp_path, mock_factory(), frontend="native", metrics_port=0) as bg:
    assert metric(scrape(bg), INTERVAL) == pytest.approx(interval, abs=1e-9)


def test_off_never_pauses_even_with_a_target(tmp_path):
  """`--no-native-read-coalesce`: the interval is 0 whatever the targets."""
  write_mock_bundle(tmp_path, "a", 1, config={"latency_slo_ms": 10})
  with serving(tmp_path, mock_factory(), frontend="native", metrics_port=0,
               native_read_coalesce=False) as bg:
    assert metric(scrape(bg), INTERVAL) == 0.0


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
  rows = 1 + i % 3
  x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) * 0.25 + i
  return x, np.full((rows, 1), i % 5 - 2, np.int32)


def _check(resp, x: np.ndarray, k: np.ndarray) -> None:
  got, (want_y, want_z) = outputs(resp), expected(x, k)
  np.testing.assert_array_equal(got["y"], want_y)
  np.testing.assert_array_equal(got["z"], want_z)


def test_concurrent_calls_are_read_together_and_answered_exactly(tmp_path):
  """One call at a time (each waits for its answer): no pause. Then 600 calls from 8 threads
  over 4 connections, 12 in flight on each: pauses are taken and every answer is exact."""
  write_mock_bundle(tmp_path, "mock", 1, config={"latency_slo_ms": 2000})
  with serving(tmp_path, mock_factory(delay_s=0.001), frontend="native", metrics_port=0) as bg:
    with grpc.insecure_channel(bg.address) as ch:
      stub = pb_grpc.GRPCInferenceServiceStub(ch)
      before = metric(scrape(bg), PAUSES)
      for i in range(40):
        x, k = _case(i)
        _check(stub.ModelInfer(mock_request(x, k), timeout=60), x, k)
      assert metric(scrape(bg), PAUSES) == before

    channels = [grpc.insecure_channel(bg.address) for _ in range(4)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]

    def worker(w: int) -> int:
      done = 0
      for start in range(w * 75, (w + 1) * 75, 12):
        cases = [_case(i) for i in range(start, min(start + 12, (w + 1) * 75))]
        futures = [stubs[w % 4].ModelInfer.future(mock_request(x, k), timeout=60)
                   for x, k in cases]
        for (x, k), fut in zip(cases, futures):
          _check(fut.result(), x, k)
          done += 1
      return done
    try:
      with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(worker, range(8))) == 600
    finally:
      for c in channels:
        c.close()
    text = scrape(bg)
    assert metric(text, PAUSES) > before
    assert metric(text, "xlaserve_native_calls_total", path="fast") >= 640
