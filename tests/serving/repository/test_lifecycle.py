"""Model lifecycle against the real server: version policies, loading and unloading through the
repository API and the poller, isolation of broken models, concurrent loading. (Swapping versions
under load: test_hot_reload.py.)"""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import jax
import numpy as np
import pytest

from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected, mock_factory, mock_request, outputs, rpc_code, serving, \
    wait_until, write_mock_bundle
from servingutil import model_ready as ready
from servingutil import repository_index as index

X = np.arange(8, dtype=np.float32).reshape(2, 4) / 4
K = np.array([[2], [-1]], np.int32)


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
    assert wait_until(lambda: ready(stub, "newcomer"))
    assert stub.ModelInfer(mock_request(X, K, model="newcomer")).model_version == "1"
    # A broken new version is reported, and the working one keeps serving.
    (repo / "mock" / "2").mkdir()
    (repo / "mock" / "2" / "manifest.json").write_text("{not json")
    assert wait_until(lambda: ("mock", "2") in index(stub))
    state, reason = index(stub)[("mock", "2")]
    assert state == "UNAVAILABLE" and "not valid JSON" in reason
    assert stub.ModelInfer(mock_request(X, K)).model_version == "1"
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    # A fixed newer version replaces it.
    write_mock_bundle(repo, "mock", 3)
    assert wait_until(lambda: stub.ModelInfer(mock_request(X, K)).model_version == "3")
    # A model folder removed from the repository is unloaded.
    shutil.rmtree(repo / "newcomer")
    assert wait_until(lambda: not ready(stub, "newcomer"))
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


def test_poller_applies_a_changed_version_policy(tmp_path):
  repo = tmp_path / "repo"
  for v in (1, 2):
    write_mock_bundle(repo, "mock", v)
  with serving(repo, mock_factory(), repository_poll_s=0.05) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert not ready(stub, "mock", "1") and ready(stub, "mock", "2")
    (repo / "mock" / "config.json").write_text(json.dumps({"version_policy": "all"}))
    assert wait_until(lambda: ready(stub, "mock", "1"))
    assert stub.ModelInfer(mock_request(X, K, version="1")).model_version == "1"
    assert stub.ModelInfer(mock_request(X, K)).model_version == "2"
    (repo / "mock" / "config.json").write_text(json.dumps({"latest_n": 1}))
    assert wait_until(lambda: not ready(stub, "mock", "1"))
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
