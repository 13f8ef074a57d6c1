"""Model lifecycle against the real server: version policies, hot reload under load, draining,
isolation of broken models."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time

import grpc
import jax
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import export
from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected, mock_factory, mock_request, outputs, rpc_code, serving, \
    write_mock_bundle

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
K = np.array([[2], [-1]], np.int32)


def index(stub) -> dict[tuple[str, str], tuple[str, str]]:
  resp = stub.RepositoryIndex(pb.RepositoryIndexRequest())
  return {(m.name, m.version): (m.state, m.reason) for m in resp.models}


def ready(stub, name, version="") -> bool:
  return stub.ModelReady(pb.ModelReadyRequest(name=name, version=version)).ready


def test_version_policies_and_named_versions(tmp_path):
  repo = tmp_path / "repo"
  policies = {"all3": {"version_policy": "all"}, "latest2": {"latest_n": 2},
              "pick": {"version_policy": "specific", "versions": [1, 3]}, "plain": None}
  for name, cfg in policies.items():
    for v in (1, 2, 3):
      write_mock_bundle(repo, name, v, config=cfg)
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)

    def version_served(model, version=""):
      resp = stub.ModelInfer(mock_request(X, K, model=model, version=version))
      np.testing.assert_array_equal(outputs(resp)["y"], expected(X, K)[0])
      return resp.model_version

    # A request without a version gets the newest served one; a named version gets itself.
    assert [version_served(m) for m in policies] == ["3", "3", "3", "3"]
    assert [version_served("all3", v) for v in "123"] == ["1", "2", "3"]
    assert [version_served("latest2", v) for v in "23"] == ["2", "3"]
    assert [version_served("pick", v) for v in "13"] == ["1", "3"]
    for model, v in [("latest2", "1"), ("pick", "2"), ("plain", "1"), ("plain", "2"),
                     ("all3", "4")]:
      with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(mock_request(X, K, model=model, version=v))
      assert e.value.code() == grpc.StatusCode.NOT_FOUND and f"no version {v}" in e.value.details()
      assert not ready(stub, model, v)
    versions = lambda m: list(stub.ModelMetadata(pb.ModelMetadataRequest(name=m)).versions)
    assert versions("all3") == ["1", "2", "3"] and versions("latest2") == ["2", "3"]
    assert versions("pick") == ["1", "3"] and versions("plain") == ["3"]
    assert stub.ModelConfig(pb.ModelConfigRequest(name="latest2")).config.version_policy \
        .latest.num_versions == 2
    assert {k for k, (state, _) in index(stub).items() if state == "READY"} == {
        ("all3", "1"), ("all3", "2"), ("all3", "3"), ("latest2", "2"), ("latest2", "3"),
        ("pick", "1"), ("pick", "3"), ("plain", "3")}


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


def _wait(cond, timeout=30.0, step=0.02) -> None:
  end = time.perf_counter() + timeout
  while not cond():
    assert time.perf_counter() < end, "timed out"
    time.sleep(step)


def _mock_load_request(rng):
  n = int(rng.integers(1, 12))
  x = rng.integers(-8, 8, size=(n, 4)).astype(np.float32) / 4
  k = rng.integers(-3, 4, size=(n, 1)).astype(np.int32)
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
      _wait(lambda: any(r[2] == "2" for r in load.all))
      _wait(lambda: index(stub)[("mock", "1")][0] == "UNAVAILABLE")
      time.sleep(0.3)
    assert load.failures() == []
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
    assert reason.startswith("retired") and index(stub)[("mock", "2")][0] == "READY"
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
      _wait(lambda: len(load.all) > n_swap + 20)
    assert load.failures() == []
    seen = {r[2] for r in load.all}
    assert seen == {"1", "2"}
    assert compiles.outside_warmup == outside  # no request ever waited on a compile
    assert compiles.warmup >= warm + 3  # the three buckets of v2, compiled while loading
    assert index(stub)[("mlp", "1")][1].startswith("retired")
    assert stub.ModelInfer(make(np.random.default_rng(0))[0]).model_version == "2"


def test_retired_version_answers_its_queued_requests_before_it_is_dropped(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
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


def test_unload_and_load_through_the_repository_api(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  write_mock_bundle(repo, "other", 1)
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mock"))
    assert not ready(stub, "mock") and ready(stub, "other")
    assert rpc_code(stub.ModelInfer, mock_request(X, K)) == grpc.StatusCode.UNAVAILABLE
    assert index(stub)[("mock", "1")] == ("UNAVAILABLE", "unloaded")
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # unloading on purpose is not a fault
    assert rpc_code(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(
        model_name="nope")) == grpc.StatusCode.NOT_FOUND
    assert rpc_code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(
        model_name="nope")) == grpc.StatusCode.NOT_FOUND
    assert ("nope", "") not in index(stub) and stub.ServerReady(pb.ServerReadyRequest()).ready
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mock"))
    assert ready(stub, "mock") and stub.ModelInfer(mock_request(X, K)).model_version == "1"


def test_poller_follows_models_appearing_breaking_and_disappearing(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  with serving(repo, mock_factory(), repository_poll_s=0.05) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    write_mock_bundle(repo, "newcomer", 1)
    _wait(lambda: ready(stub, "newcomer"))
    assert stub.ModelInfer(mock_request(X, K, model="newcomer")).model_version == "1"
    # A broken new version is reported, and the working one keeps serving.
    (repo / "mock" / "2").mkdir()
    (repo / "mock" / "2" / "manifest.json").write_text("{not json")
    _wait(lambda: ("mock", "2") in index(stub))
    state, reason = index(stub)[("mock", "2")]
    assert state == "UNAVAILABLE" and "not valid JSON" in reason
    assert stub.ModelInfer(mock_request(X, K)).model_version == "1"
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    # A fixed newer version replaces it.
    write_mock_bundle(repo, "mock", 3)
    _wait(lambda: stub.ModelInfer(mock_request(X, K)).model_version == "3")
    # A model folder removed from the repository is unloaded.
    shutil.rmtree(repo / "newcomer")
    _wait(lambda: not ready(stub, "newcomer"))
    assert index(stub)[("newcomer", "1")] == ("UNAVAILABLE", "unloaded")


class FailingWarmupEngine(MockEngine):
  def __init__(self, error: BaseException):
    super().__init__()
    self.error, self.closed = error, False

  def warmup(self, *, progress=None):
    raise self.error

  def close(self):
    self.closed = True


def test_broken_models_are_isolated_with_reasons(tmp_path):
  repo = tmp_path / "repo"
  for name in ("good", "corrupt", "oldformat", "factory", "oom", "xla_oom"):
    write_mock_bundle(repo, name, 1)
  (repo / "corrupt" / "1" / "manifest.json").write_text('{"format_version": 1, "name":')
  m = json.loads((repo / "oldformat" / "1" / "manifest.json").read_text())
  (repo / "oldformat" / "1" / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
  (repo / "unfinished" / "1").mkdir(parents=True)  # a copy still in progress: no manifest yet
  write_mock_bundle(repo, "badconfig", 2, config={"latest_n": 0})
  engines = {}

  def factory(path, manifest, cfg):
    if manifest.name == "factory":
      raise RuntimeError("cannot place the model")
    error = {"oom": MemoryError("warm-up buffers"),
             "xla_oom": jax.errors.JaxRuntimeError(
                 "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1073741824 bytes.")
             }.get(manifest.name)
    eng = FailingWarmupEngine(error) if error else MockEngine()
    engines[manifest.name] = eng
    return eng

  with serving(repo, factory) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    idx = index(stub)
    expect = {("corrupt", "1"): "is not valid JSON",
              ("oldformat", "1"): "format_version 99 is not supported",
              ("factory", "1"): "RuntimeError: cannot place the model",
              ("oom", "1"): "MemoryError: warm-up buffers (out of memory",
              ("xla_oom", "1"): "RESOURCE_EXHAUSTED: Out of memory",
              ("unfinished", ""): "no complete version",
              ("badconfig", ""): "latest_n must be >= 1"}
    for key, needle in expect.items():
      state, reason = idx[key]
      assert state == "UNAVAILABLE" and needle in reason, (key, reason)
      assert not ready(stub, key[0])
      with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(mock_request(X, K, model=key[0]))
      assert e.value.code() == grpc.StatusCode.UNAVAILABLE and needle in e.value.details()
    assert "out of memory" in idx[("xla_oom", "1")][1]
    assert engines["oom"].closed and engines["xla_oom"].closed  # half-warmed memory given back
    assert idx[("good", "1")] == ("READY", "")
    assert ready(stub, "good")
    resp = stub.ModelInfer(mock_request(X, K, model="good"))
    np.testing.assert_array_equal(outputs(resp)["y"], expected(X, K)[0])
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready  # strict: a model is down
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.state) for m in ready_only.models] == [("good", "READY")]


def test_request_routed_to_a_version_retired_under_it_goes_to_the_new_default(tmp_path):
  """The race a hot reload opens: lookup picks v1, then v1 retires before submit."""
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    repository = bg.server.repository
    runner = repository.get("mock", 1).runner
    submit = runner.submit

    def racing_submit(req):
      write_mock_bundle(repo, "mock", 2)
      repository.load("mock")  # v2 loads, becomes the default, v1 retires and stops
      assert repository.get("mock").version == 2
      submit(req)  # refused: v1 is stopping

    runner.submit = racing_submit
    resp = stub.ModelInfer(mock_request(X, K))
    assert resp.model_version == "2"
    np.testing.assert_array_equal(outputs(resp)["y"], expected(X, K)[0])


def test_poller_applies_a_changed_version_policy(tmp_path):
  repo = tmp_path / "repo"
  for v in (1, 2):
    write_mock_bundle(repo, "mock", v)
  with serving(repo, mock_factory(), repository_poll_s=0.05) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert not ready(stub, "mock", "1") and ready(stub, "mock", "2")
    (repo / "mock" / "config.json").write_text(json.dumps({"version_policy": "all"}))
    _wait(lambda: ready(stub, "mock", "1"))
    assert stub.ModelInfer(mock_request(X, K, version="1")).model_version == "1"
    assert stub.ModelInfer(mock_request(X, K)).model_version == "2"
    (repo / "mock" / "config.json").write_text(json.dumps({"latest_n": 1}))
    _wait(lambda: not ready(stub, "mock", "1"))
    assert index(stub)[("mock", "1")][1].startswith("retired")
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


@pytest.mark.parametrize("threads", [1, 3])
def test_models_load_several_at_once(tmp_path, threads):
  """`load_all(threads=N)` (--model-load-thread-count) loads N models at a time: "a" and "b"
  each wait at a barrier for the other's load to be under way, which only concurrent loading
  passes; the broken model is isolated either way."""
  from serving.kinds import runner_factories
  from serving.repository import ModelRepository, State

  for name in ("a", "b", "c"):
    write_mock_bundle(tmp_path, name)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "1").mkdir()
  (tmp_path / "broken" / "1" / "manifest.json").write_text("{not json")
  barrier = threading.Barrier(2, timeout=2.0)
  make = mock_factory()

  def factory(path, manifest, cfg):
    if manifest.name in ("a", "b"):
      barrier.wait()  # BrokenBarrierError (the load fails) unless the other load runs meanwhile
    return make(path, manifest, cfg)

  repo = ModelRepository(tmp_path, kinds=runner_factories(factory))
  try:
    repo.load_all(threads=threads)
    states = {r.name: r.state for r in repo.records()}
    assert states["c"] is State.READY and states["broken"] is State.UNAVAILABLE
    both = State.READY if threads > 1 else State.UNAVAILABLE
    assert states["a"] is both and states["b"] is both
  finally:
    for r in repo.records():
      if r.state is State.READY:
        repo.unload(r.name, r.version)
