"""A model's latency target against the real server, on both batch queues: overload without any
per-request deadline is shed with RESOURCE_EXHAUSTED at once, the admitted requests finish
within the target, the excess is counted, and ModelConfig reports the target and its queue
policy. Plus: config.json keys override the server's defaults, the others are inherited."""

from __future__ import annotations

import asyncio
import collections
import gc
import time

import grpc
import numpy as np
import pytest

from benchmarks.loadgen import build_request
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.repository import ModelServingConfig
from servingutil import expected, metric, mock_factory, mock_request, outputs, serving, \
    write_mock_bundle


def open_loop(address: str, payload: bytes, rate: float, seconds: float) -> list[tuple[float, str]]:
  """Sends `payload` at `rate` requests/s for `seconds` without waiting for answers (one
  asyncio client, no deadline); returns (latency, gRPC code name) per request."""
  async def run():
    out = []
    async with grpc.aio.insecure_channel(address) as ch:
      call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")

      async def one():
        t0 = time.perf_counter()
        try:
          await call(payload, timeout=60)
          out.append((time.perf_counter() - t0, "OK"))
        except grpc.aio.AioRpcError as e:
          out.append((time.perf_counter() - t0, e.code().name))
      tasks, start = [], time.perf_counter()
      for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.ensure_future(one()))
      await asyncio.gather(*tasks)
    return out
  return asyncio.run(run())


@pytest.mark.parametrize("frontend,batch_queue", [
    ("auto", "native"), pytest.param("python", "python", marks=pytest.mark.slow)])
def test_overload_without_deadlines_is_shed_and_the_admitted_meet_the_target(
    tmp_path, frontend, batch_queue):
  """3x the sustainable rate of full-batch requests for 3 s, none carrying a deadline."""
  target_ms, delay_s, rows, duration = 400, 0.02, 8, 3.0
  capacity = 1 / delay_s  # one 8-row batch per 20 ms (one instance): 50 requests/s
  write_mock_bundle(tmp_path, "mock", 1, config={"latency_slo_ms": target_ms,
                                                 "instance_count": 1})
  with serving(tmp_path, mock_factory(delay_s=delay_s), frontend=frontend,
               batch_queue=batch_queue) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    cfg = stub.ModelConfig(pb.ModelConfigRequest(name="mock")).config
    assert cfg.parameters["latency_slo_ms"].string_value == str(target_ms)
    assert cfg.parameters["latency_slo_percentile"].string_value == "99"
    policy = cfg.dynamic_batching.default_queue_policy
    assert policy.default_timeout_microseconds == target_ms * 1000
    x, k = np.full((rows, 4), 1.0, np.float32), np.ones((rows, 1), np.int32)
    for _ in range(3):  # batch times measured before the load starts
      stub.ModelInfer(mock_request(x, k))
    gc.collect()  # as `xlaserve serve` does once loaded: a full collection of this test process
    gc.freeze()   # (pytest, JAX) would otherwise stall the in-process server ~60 ms mid-run
    try:
      got = open_loop(bg.address, build_request("mock", {"x": x, "k": k}), 3 * capacity,
                      duration)
    finally:
      gc.unfreeze()
    np.testing.assert_array_equal(outputs(stub.ModelInfer(mock_request(x, k)))["y"],
                                  expected(x, k)[0])
    codes = collections.Counter(code for _, code in got)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["RESOURCE_EXHAUSTED"] > 0.4 * len(got)  # two thirds of the load is excess
    assert codes["OK"] >= 0.7 * capacity * duration  # goodput holds up
    ok = np.array([s for s, code in got if code == "OK"])
    assert np.percentile(ok, 99) * 1e3 <= target_ms
    text = bg.server.metrics.exposition().decode()
    mv = {"model": "mock", "version": "1"}
    assert metric(text, "nv_inference_request_failure", reason="RESOURCE_EXHAUSTED",
                  **mv) == codes["RESOURCE_EXHAUSTED"]
    assert metric(text, "nv_inference_request_success", **mv) == codes["OK"] + 4


def test_config_json_overrides_the_server_defaults_key_by_key():
  server = ModelServingConfig(max_queue_wait_ms=300.0, latency_slo_ms=40.0, instance_count=3)
  got = ModelServingConfig.from_json({"latency_slo_ms": 10}, server)
  assert (got.latency_slo_ms, got.max_queue_wait_ms, got.instance_count) == (10, 300.0, 3)
  assert ModelServingConfig.from_json({}).max_queue_wait_ms == 1000.0
  with pytest.raises(ValueError, match="latency_slo_ms must be > 0"):
    ModelServingConfig.from_json({"latency_slo_ms": 0}, server)
  with pytest.raises(ValueError, match="unknown keys"):
    ModelServingConfig.from_json({"latency_slo": 10}, server)
