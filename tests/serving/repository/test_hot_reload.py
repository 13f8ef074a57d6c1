"""Hot reload against the real server: a new version swaps in under load without a failed or
waiting request, warm-up (and every compile) stays off the request path, and a retired version
answers what it queued before it goes."""

from __future__ import annotations

import concurrent.futures
import shutil
import threading
import time

import grpc
import jax
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import export
from serving.frontend import native as native_frontend
from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected, mock_factory, mock_request, mock_rows, outputs, serving, \
    wait_until, write_mock_bundle
from servingutil import repository_index as index

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
K = np.array([[2], [-1]], np.int32)


class SlowWarmupEngine(MockEngine):
  """A MockEngine whose warm-up takes time (a stand-in for compiling) and says where it ran."""

  def __init__(self, warmup_s: float, **kw):
    super().__init__(**kw)
    self.warmup_s = warmup_s
    self.warm_thread = None
    self.warm_window = (0.0, 0.0)

  def warmup(self, *, progress=None):
    t0 = time.perf_counter()
    self.warm_thread = threading.current_thread().name
    time.sleep(self.warmup_s)
    self.warm_window = (t0, time.perf_counter())
    self.warm = True


class Load:
  """Closed-loop request threads recording (start, latency, served version or error code)."""

  def __init__(self, address: str, threads: int, make_request, check=None):
    self.address, self.make_request, self.check = address, make_request, check
    self.stop = threading.Event()
    self.results: list[list[tuple]] = [[] for _ in range(threads)]
    self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                    for i in range(threads)]

  def _run(self, i: int) -> None:
    rng = np.random.default_rng(i)
    with grpc.insecure_channel(self.address) as ch:
      stub = pb_grpc.GRPCInferenceServiceStub(ch)
      while not self.stop.is_set():
        req, inputs = self.make_request(rng)
        t0 = time.perf_counter()
        try:
          resp = stub.ModelInfer(req, timeout=30)
          if self.check is not None:
            self.check(resp, inputs)
          self.results[i].append((t0, time.perf_counter() - t0, resp.model_version))
        except grpc.RpcError as e:
          self.results[i].append((t0, time.perf_counter() - t0, e.code().name))
        except AssertionError as e:
          self.results[i].append((t0, time.perf_counter() - t0, f"WRONG: {e}"))

  def __enter__(self) -> Load:
    for t in self.threads:
      t.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.set()
    for t in self.threads:
      t.join(60)

  @property
  def all(self) -> list[tuple]:
    return [r for rs in self.results for r in rs]

  def failures(self) -> list[tuple]:
    return [r for r in self.all if not r[2].isdigit()]


def _mock_load_request(rng):
  x, k = mock_rows(rng, int(rng.integers(1, 12)))
  return mock_request(x, k), (x, k)


def _check_mock(resp, inputs):
  y, z = expected(*inputs)
  out = outputs(resp)
  np.testing.assert_array_equal(out["y"], y)
  np.testing.assert_array_equal(out["z"], z)


def test_poll_hot_reload_under_load_swaps_without_a_failed_or_waiting_request(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  engines = {}

  def factory(path, manifest, cfg):
    eng = SlowWarmupEngine(warmup_s=0.0 if manifest.version == 1 else 1.0, delay_s=0.002)
    engines[manifest.version] = eng
    return eng

  with serving(repo, factory, repository_poll_s=0.05) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    with Load(bg.address, 4, _mock_load_request, _check_mock) as load:
      time.sleep(0.3)
      write_mock_bundle(repo, "mock", 2)  # the manifest is written last: complete when it appears
      assert wait_until(lambda: any(r[2] == "2" for r in load.all))
      assert wait_until(lambda: index(stub)[("mock", "1")][0] == "UNAVAILABLE")
      time.sleep(0.3)
    assert load.failures() == []
    # No request waits at the swap (a draining queue once spun holding its lock: 0.5-1.5 s).
    assert max(r[1] for r in load.all) < 0.4
    # Warm-up ran on the poller thread; v1 kept answering promptly while it ran.
    assert engines[2].warm_thread == "repository-poller"
    w0, w1 = engines[2].warm_window
    during = [r for r in load.all if w0 <= r[0] and r[0] + r[1] <= w1]
    assert len(during) > 10 and {r[2] for r in during} == {"1"}
    assert max(r[1] for r in during) < 0.5 * (w1 - w0)
    # Each client saw version 1, then version 2, never back.
    for rs in load.results:
      seq = [r[2] for r in rs]
      assert seq == sorted(seq) and seq[0] == "1" and seq[-1] == "2", seq
    state, reason = index(stub)[("mock", "1")]
    assert state == "UNAVAILABLE" and reason.startswith("retired")
    assert index(stub)[("mock", "2")] == ("READY", "")
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert bg.server.poller.polls > 0


def _export_mlp(repo, version: int):
  rng = np.random.default_rng(version)
  params = {"w": rng.normal(size=(16, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  export.export_model(lambda p, inputs: {"y": jax.numpy.tanh(inputs["x"] @ p["w"]) + p["b"]},
                      params=params, repository=repo, name="mlp", version=version,
                      inputs=[export.Input("x", "float32", ("batch", 16))],
                      config=export.ExportConfig(batch_buckets=(1, 8, 64)))
  return params


def test_repository_load_swaps_a_real_bundle_with_compiles_only_in_warmup(tmp_path):
  repo, staging = tmp_path / "repo", tmp_path / "staging"
  params = {1: _export_mlp(repo, 1), 2: _export_mlp(staging, 2)}

  def make(rng):
    x = rng.normal(size=(int(rng.integers(1, 20)), 16)).astype(np.float32)
    req = pb.ModelInferRequest(model_name="mlp")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req, x

  def check(resp, x):
    p = params[int(resp.model_version)]
    np.testing.assert_allclose(outputs(resp)["y"], np.tanh(x @ p["w"]) + p["b"], rtol=1e-5,
                               atol=1e-5)

  with serving(repo) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    compiles = bg.server.compiles
    outside, warm = compiles.outside_warmup, compiles.warmup
    with Load(bg.address, 3, make, check) as load:
      time.sleep(0.3)
      shutil.move(str(staging / "mlp" / "2"), str(repo / "mlp" / "2"))
      stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"))
      n_swap = len(load.all)
      assert wait_until(lambda: len(load.all) > n_swap + 20)
    assert load.failures() == []
    seen = {r[2] for r in load.all}
    assert seen == {"1", "2"}
    assert compiles.outside_warmup == outside  # no request ever waited on a compile
    assert compiles.warmup >= warm + 3  # the three buckets of v2, compiled while loading
    assert index(stub)[("mlp", "1")][1].startswith("retired")
    assert stub.ModelInfer(make(np.random.default_rng(0))[0]).model_version == "2"


def test_retired_version_answers_its_queued_requests_before_it_is_dropped(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"max_queue_wait_ms": 0})  # ~1 s queued on purpose
  engines = {}
  with serving(repo, mock_factory(engines, delay_s=0.15)) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    x, k = np.ones((8, 4), np.float32), np.full((8, 1), 3, np.int32)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      futs = [pool.submit(stub.ModelInfer, mock_request(x * i, k, version="1"), timeout=30)
              for i in range(6)]  # one full batch each: about 0.9 s of queued work on v1
      time.sleep(0.1)
      write_mock_bundle(repo, "mock", 2)
      t0 = time.perf_counter()
      stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mock"))
      load_s = time.perf_counter() - t0
      for i, f in enumerate(futs):
        resp = f.result()
        assert resp.model_version == "1"
        np.testing.assert_array_equal(outputs(resp)["z"], x * i * k)
    assert load_s > 0.4  # the load returned only once v1 had drained
    assert engines[("mock", 1)].batches == [8] * 6
    with pytest.raises(grpc.RpcError) as e:
      stub.ModelInfer(mock_request(X, K, version="1"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "retired" in e.value.details()
    assert stub.ModelInfer(mock_request(X, K)).model_version == "2"


@pytest.mark.parametrize("frontend", ["python", "native"])
def test_request_routed_to_a_version_retired_under_it_goes_to_the_new_default(tmp_path, frontend):
  """The race a hot reload opens: lookup picks v1, then v1 retires before its request is queued.
  Python front end: between the servicer's lookup and `submit`. Native front end: the C++ model
  table still lists v1 (not yet republished) when v1's queue has stopped."""
  if frontend == "native" and native_frontend.load_extension()[0] is None:
    pytest.skip(native_frontend.load_extension()[1])
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  with serving(repo, mock_factory(), frontend=frontend) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    repository = bg.server.repository
    if frontend == "python":
      runner = repository.get("mock", 1).runner
      submit = runner.submit

      def racing_submit(req):
        write_mock_bundle(repo, "mock", 2)
        repository.load("mock")  # v2 loads, becomes the default, v1 retires and stops
        assert repository.get("mock").version == 2
        submit(req)  # refused: v1 is stopping

      runner.submit = racing_submit
    else:
      bg.server.native.refresh = lambda: None  # the table keeps listing v1's stopped queue
      write_mock_bundle(repo, "mock", 2)
      repository.load("mock")
      assert repository.get("mock").version == 2
    resp = stub.ModelInfer(mock_request(X, K))
    assert resp.model_version == "2"
    np.testing.assert_array_equal(outputs(resp)["y"], expected(X, K)[0])
