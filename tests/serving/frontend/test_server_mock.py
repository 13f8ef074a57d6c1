"""The real gRPC server on 127.0.0.1 driven by tritonclient, against the hand-checkable MockEngine."""

import concurrent.futures
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from clientutil import call_concurrently
from clientutil import infer as triton_infer
from clientutil import triton_inputs
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected
from servingutil import mock_rows as rand_rows


def infer(client, x, k, model="mock", **kw):
  """(y, z) for one tritonclient call to the MockEngine."""
  out = triton_infer(client, model, {"x": x, "k": k}, ("y", "z"), **kw)
  return out["y"], out["z"]


def test_metadata_config_and_health(start_mock_server):
  bg, _ = start_mock_server()
  c = tc.InferenceServerClient(bg.address)
  assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mock")
  assert not c.is_model_ready("nope")
  assert "statistics" in c.get_server_metadata().extensions
  md = c.get_model_metadata("mock")
  assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
      ("x", "FP32", [-1, 4]), ("k", "INT32", [-1, 1])]
  cfg = c.get_model_config("mock").config
  assert [list(i.dims) for i in cfg.input] == [[4], [1]]
  assert list(cfg.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8]
  assert cfg.max_batch_size >= 8
  idx = c.get_model_repository_index()
  assert [(m.name, m.version, m.state) for m in idx.models] == [("mock", "1", "READY")]
  with grpc.insecure_channel(bg.address) as ch:
    h = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "inference.GRPCInferenceService"):
      assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
          health_pb2.HealthCheckResponse.SERVING


def test_concurrent_requests_of_any_size_get_exact_answers(start_mock_server):
  bg, engines = start_mock_server()
  rng = np.random.default_rng(0)
  cases = [rand_rows(rng, int(n)) for n in rng.integers(1, 30, size=60)]  # many exceed bucket 8

  results = call_concurrently(bg.address, infer, cases)
  for (x, k), (y, z) in zip(cases, results):
    ey, ez = expected(x, k)
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(z, ez)
  eng = engines["mock"]
  assert set(eng.batches) <= {1, 2, 4, 8}
  total_rows = sum(x.shape[0] for x, _ in cases)
  assert sum(eng.batches) >= total_rows  # every row ran, padding only adds
  stats = tc.InferenceServerClient(bg.address).get_inference_statistics("mock")
  assert stats.model_stats[0].inference_count == total_rows
  assert stats.model_stats[0].inference_stats.success.count == len(cases)


def test_typed_contents_and_requested_outputs(start_mock_server):
  bg, _ = start_mock_server()
  req = pb.ModelInferRequest(model_name="mock", id="req-7")
  t = req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
  t.contents.fp32_contents.extend([1, 2, 3, 4, 0.5, 0.5, 0.5, 0.5])
  t = req.inputs.add(name="k", datatype="INT32", shape=[2, 1])
  t.contents.int_contents.extend([3, -1])
  req.outputs.add(name="y")
  with grpc.insecure_channel(bg.address) as ch:
    resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req)
  assert resp.id == "req-7" and [o.name for o in resp.outputs] == ["y"]
  y = np.frombuffer(resp.raw_output_contents[0], np.float32)
  np.testing.assert_array_equal(y, [21.0, 5.0])  # 2*10+1, 2*2+1


def test_int64_ids_accepted_for_int32_input_with_range_check(start_mock_server):
  bg, _ = start_mock_server()
  c = tc.InferenceServerClient(bg.address)
  x = np.ones((1, 4), np.float32)
  ins = triton_inputs({"x": x, "k": np.array([[2]], np.int64)})
  assert ins[1].datatype() == "INT64"
  np.testing.assert_array_equal(c.infer("mock", ins).as_numpy("z"), [[2, 2, 2, 2]])
  with pytest.raises(InferenceServerException, match="outside INT32 range"):
    c.infer("mock", triton_inputs({"x": x, "k": np.array([[2**40]], np.int64)}))


def _raw_request(x_shape=(2, 4), x_dtype="FP32", k_shape=(2, 1), x_bytes=None, names=("x", "k"),
                 model="mock", version=""):
  req = pb.ModelInferRequest(model_name=model, model_version=version)
  req.inputs.add(name=names[0], datatype=x_dtype, shape=list(x_shape))
  n = int(np.prod(x_shape))
  req.raw_input_contents.append(x_bytes if x_bytes is not None else
                                np.zeros(n, np.float32).tobytes())
  if len(names) > 1:
    req.inputs.add(name=names[1], datatype="INT32", shape=list(k_shape))
    req.raw_input_contents.append(np.zeros(int(np.prod(k_shape)), np.int32).tobytes())
  return req


@pytest.mark.parametrize("req,code,needle", [
    (_raw_request(model="nope"), grpc.StatusCode.NOT_FOUND, "'nope' is not in the repository"),
    (_raw_request(version="7"), grpc.StatusCode.NOT_FOUND, "no version 7"),
    (_raw_request(model="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
    (_raw_request(names=("x",)), grpc.StatusCode.INVALID_ARGUMENT, "missing inputs ['k']"),
    (_raw_request(names=("x", "kk")), grpc.StatusCode.INVALID_ARGUMENT, "unexpected input 'kk'"),
    (_raw_request(x_dtype="FP16", x_bytes=b"\0" * 16), grpc.StatusCode.INVALID_ARGUMENT,
     "datatype FP16 given, expected FP32"),
    (_raw_request(x_shape=(2, 5)), grpc.StatusCode.INVALID_ARGUMENT, "input 'x': shape [2, 5]"),
    (_raw_request(x_shape=(2, 4, 1)), grpc.StatusCode.INVALID_ARGUMENT, "has rank 3"),
    (_raw_request(x_bytes=b"\0" * 31), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'x': 31 raw bytes, expected 32"),
    (_raw_request(k_shape=(3, 1)), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'k' has 3 rows but another input has 2"),
    (_raw_request(x_shape=(0, 4)), grpc.StatusCode.INVALID_ARGUMENT, "input 'x': shape [0, 4]"),
    (_raw_request(version="x1"), grpc.StatusCode.INVALID_ARGUMENT, "not an integer"),
])
def test_bad_requests_get_clear_errors_and_server_keeps_serving(start_mock_server, req, code,
                                                                needle):
  bg, _ = start_mock_server()
  with grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
      stub.ModelInfer(req)
    assert e.value.code() == code
    assert needle in e.value.details()
  c = tc.InferenceServerClient(bg.address)
  y, _ = infer(c, np.ones((1, 4), np.float32), np.ones((1, 1), np.int32))
  np.testing.assert_array_equal(y, [[9.0]])


def test_failing_batch_only_fails_the_poisoned_request(start_mock_server):
  bg, _ = start_mock_server(delay_s=0.02, fail_value=-999.0)
  rng = np.random.default_rng(1)
  good = [rand_rows(rng, 2) for _ in range(6)]
  bad_x = np.full((1, 4), -999.0, np.float32)

  cases = good[:3] + [(bad_x, np.ones((1, 1), np.int32))] + good[3:]
  results = call_concurrently(bg.address, infer, cases, workers=7, errors=True)
  assert isinstance(results[3], InferenceServerException)
  assert "INTERNAL" in str(results[3].status()) and "injected failure" in results[3].message()
  for (x, k), r in zip(good, results[:3] + results[4:]):
    np.testing.assert_array_equal(r[0], expected(x, k)[0])


def test_deadline_passed_in_queue_is_never_executed(start_mock_server):
  bg, engines = start_mock_server(delay_s=0.3)
  c = tc.InferenceServerClient(bg.address)
  x, k = np.ones((8, 4), np.float32), np.ones((8, 1), np.int32)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    blocker = pool.submit(infer, c, x, k)  # occupies the engine for 0.3 s
    time.sleep(0.05)
    late = pool.submit(infer, c, x[:1] * 5, k[:1], client_timeout=0.1)
    with pytest.raises(InferenceServerException, match="Deadline"):
      late.result()
    blocker.result()
  time.sleep(0.4)
  assert engines["mock"].batches == [8]  # the late request never ran


def test_triton_timeout_parameter_expires_in_queue(start_mock_server):
  bg, engines = start_mock_server(delay_s=0.3)
  c = tc.InferenceServerClient(bg.address)
  x, k = np.ones((8, 4), np.float32), np.ones((8, 1), np.int32)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    blocker = pool.submit(infer, c, x, k)
    time.sleep(0.05)
    with pytest.raises(InferenceServerException, match="deadline passed while queued"):
      infer(c, x[:1], k[:1], timeout=50_000)  # Triton's `timeout` is in microseconds
    blocker.result()
  assert engines["mock"].batches == [8]


def test_queue_bound_sheds_with_resource_exhausted(start_mock_server):
  bg, engines = start_mock_server(delay_s=0.2, config={"max_queue_rows": 8})
  c = tc.InferenceServerClient(bg.address)
  x, k = np.ones((8, 4), np.float32), np.ones((8, 1), np.int32)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futs = [pool.submit(infer, c, x, k)]
    time.sleep(0.05)  # the first one is running (not queued) before the rest arrive
    futs += [pool.submit(infer, c, x, k) for _ in range(3)]
    outcomes = []
    for f in futs:
      try:
        f.result()
        outcomes.append("ok")
      except InferenceServerException as e:
        outcomes.append(e.status())
  assert "StatusCode.RESOURCE_EXHAUSTED" in outcomes
  assert outcomes.count("ok") >= 2  # one running, one queued
  assert engines["mock"].batches == [8] * outcomes.count("ok")  # a shed request never ran


def test_predict_requests_inside_a_stream_get_exact_answers(start_mock_server):
  import queue as queue_mod

  bg, _ = start_mock_server()
  rng = np.random.default_rng(4)
  cases = [rand_rows(rng, n) for n in (1, 3, 11)]  # 11 rows: split across batches
  results: queue_mod.Queue = queue_mod.Queue()
  c = tc.InferenceServerClient(bg.address)
  c.start_stream(callback=lambda result, error: results.put((result, error)))
  try:
    for i, (x, k) in enumerate(cases):
      c.async_stream_infer("mock", triton_inputs({"x": x, "k": k}), request_id=str(i))
    bad = triton_inputs({"x": np.zeros((1, 5), np.float32), "k": np.zeros((1, 1), np.int32)})
    c.async_stream_infer("mock", bad, request_id="bad")
    got, errors = {}, []
    while len(got) + len(errors) < len(cases) + 1:
      result, error = results.get(timeout=30)
      if error is not None:
        errors.append(str(error))
      else:
        got[result.get_response().id] = result.as_numpy("y")
  finally:
    c.stop_stream()
  assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0] and "'x'" in errors[0]
  for i, (x, k) in enumerate(cases):
    np.testing.assert_array_equal(got[str(i)], expected(x, k)[0])
