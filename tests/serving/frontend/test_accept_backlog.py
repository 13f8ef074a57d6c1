"""The native front end's accept backlog (`native_accept_backlog`): past that many accepted
ModelInfer calls awaiting their message, further calls wait inside gRPC until one is read. Set
to 2 here so a burst crosses it many times over: every call must still be answered, exactly
(the MockEngine's outputs worked by hand), and streams left idle must not count against it."""

from __future__ import annotations

import concurrent.futures
import queue
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("backlog")
  # No queue-wait bound to speak of: on a loaded machine the burst may queue past the default
  # 1 s and be shed, which is right, but this test is about every call being answered.
  write_mock_bundle(repo, "mock", 1, config={"max_queue_wait_ms": 60000})
  with serving(repo, mock_factory(delay_s=0.002), frontend="native",
               native_accept_backlog=2, metrics_port=0) as bg:
    yield bg


def _case(i: int) -> tuple[np.ndarray, np.ndarray]:
  rows = 1 + i % 3
  x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) + i
  return x, np.full((rows, 1), i % 7, np.int32)


def test_a_burst_far_past_the_backlog_is_answered_exactly(served):
  """400 calls at once over 4 connections against a backlog of 2: each is accepted in turn as
  earlier ones are read, none is lost or mixed up with another, and afterwards the backlog
  gauge is back to zero (no call left counted)."""
  channels = [grpc.insecure_channel(served.address) for _ in range(4)]
  try:
    stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
    cases = [_case(i) for i in range(400)]
    futures = [stubs[i % 4].ModelInfer.future(mock_request(x, k), timeout=60)
               for i, (x, k) in enumerate(cases)]
    for (x, k), fut in zip(cases, futures):
      got = outputs(fut.result())
      want_y, want_z = expected(x, k)
      np.testing.assert_array_equal(got["y"], want_y)
      np.testing.assert_array_equal(got["z"], want_z)
  finally:
    for ch in channels:
      ch.close()
  url = f"http://127.0.0.1:{served.server.metrics_port}/metrics"
  text = urllib.request.urlopen(url, timeout=10).read().decode()
  assert metric(text, "xlaserve_native_unread_calls") == 0
  assert metric(text, "xlaserve_native_calls_total", path="fast") >= 400


def test_idle_streams_past_the_backlog_do_not_stop_new_calls(served):
  """Streams opened without a message (a client keeping ModelStreamInfer open) are not calls
  awaiting their message: with more of them open than the backlog, unary calls are served, and
  each stream still answers what it sends later."""
  with grpc.insecure_channel(served.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    # More than the backlog and the 32 call objects the front end keeps on offer together: were
    # idle streams counted, the unary calls below would never be accepted.
    feeds = [queue.Queue() for _ in range(40)]

    def requests(feed: queue.Queue):
      while (item := feed.get()) is not None:
        yield item

    streams = [stub.ModelStreamInfer(requests(f), timeout=60) for f in feeds]
    try:
      with concurrent.futures.ThreadPoolExecutor(4) as pool:
        cases = [_case(i) for i in range(8)]
        got = list(pool.map(lambda c: stub.ModelInfer(mock_request(*c), timeout=30), cases))
      for (x, k), answer in zip(cases, got):
        np.testing.assert_array_equal(outputs(answer)["y"], expected(x, k)[0])
      for i, (feed, stream) in enumerate(zip(feeds, streams)):
        x, k = _case(100 + i)
        feed.put(mock_request(x, k))
        answer = next(stream)
        assert not answer.error_message, answer.error_message
        np.testing.assert_array_equal(outputs(answer.infer_response)["z"], expected(x, k)[1])
    finally:
      for feed in feeds:
        feed.put(None)
      for stream in streams:
        stream.cancel()
