"""Read coalescing in the native gRPC front end under a latency target (native/cq_poll.cc;
opt-in with --native-read-coalesce): once calls arrive often enough (and two or more are open),
its worker pauses for 2% of the tightest target (at most 500 us) instead of blocking, so later
arrivals are read together. The interval follows the served models' targets and is 0 by
default; under concurrent load every call is still answered exactly (the MockEngine's outputs
worked by hand) and pauses are taken; one call at a time never pauses, however fast."""

from __future__ import annotations

import collections
import concurrent.futures
import urllib.request

import grpc
import numpy as np
import pytest

from benchmarks import native_sut
from benchmarks.loadgen import build_request
from benchmarks.slo_sut import InProcessSut
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
  with serving(tmp_path, mock_factory(), frontend="native", metrics_port=0,
               native_read_coalesce=True) as bg:
    assert metric(scrape(bg), INTERVAL) == pytest.approx(interval, abs=1e-9)


def test_off_by_default_even_with_a_target(tmp_path):
  """Without `--native-read-coalesce` the interval is 0 whatever the targets."""
  write_mock_bundle(tmp_path, "a", 1, config={"latency_slo_ms": 10})
  with serving(tmp_path, mock_factory(), frontend="native", metrics_port=0) as bg:
    assert metric(scrape(bg), INTERVAL) == 0.0


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
  rows = 1 + i % 3
  x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) * 0.25 + i
  return x, np.full((rows, 1), i % 5 - 2, np.int32)


def _check(resp, x: np.ndarray, k: np.ndarray) -> None:
  got, (want_y, want_z) = outputs(resp), expected(x, k)
  np.testing.assert_array_equal(got["y"], want_y)
  np.testing.assert_array_equal(got["z"], want_z)


def test_calls_under_load_are_read_together_and_answered_exactly(tmp_path):
  """The C++ gRPC client, one call at a time (thousands a second, each waiting for its answer):
  no pause. Then 64 calls in flight while 4 threads send 300 calls of their own: pauses are
  taken, every answer is exact and every C++ call is answered OK."""
  built, why = native_sut.available()
  if built is None:
    pytest.skip(f"the C++ client does not build here: {why.splitlines()[0]}")
  write_mock_bundle(tmp_path, "mock", 1, config={"latency_slo_ms": 2000})
  x, k = _case(0)  # one row
  with serving(tmp_path, mock_factory(), frontend="native", metrics_port=0,
               native_read_coalesce=True) as bg, \
      InProcessSut(bg.address, build_request("mock", {"x": x, "k": k})) as sut, \
      grpc.insecure_channel(bg.address) as ch:
    before = metric(scrape(bg), PAUSES)
    assert sut.closed_loop(1, 1.5) > 0
    assert metric(scrape(bg), PAUSES) == before
    stub = pb_grpc.GRPCInferenceServiceStub(ch)

    def mine(w: int) -> int:
      for i in range(w * 75, (w + 1) * 75):
        x, k = _case(i)
        _check(stub.ModelInfer(mock_request(x, k), timeout=60), x, k)
      return 75
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
      load = pool.submit(sut.closed_loop, 64, 3.0)
      assert sum(pool.map(mine, range(4))) == 300
      assert load.result() > 0
    codes = collections.Counter(code for _, code in sut.records)
    assert set(codes) == {"OK"}, codes
    text = scrape(bg)
    assert metric(text, PAUSES) > before
    assert metric(text, "xlaserve_native_calls_total", path="fast") >= 300 + codes["OK"]
