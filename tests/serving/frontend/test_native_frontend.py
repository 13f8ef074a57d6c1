"""The native (C++) gRPC front end against the real server: deadlines, model default timeouts,
unload and reload, new versions, shutdown, auth, released call state, and which front end a
server picks. (Byte parity with the Python front end: test_native_parity.py.)"""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest

from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.server import BackgroundServer, Server, ServerConfig
from servingutil import mock_factory, mock_request, outputs, rpc_code, rpc_result, serving, \
    write_mock_bundle

NATIVE, WHY = native_frontend.load_extension()
needs_native = pytest.mark.skipif(NATIVE is None, reason=WHY)


def test_extension_is_built_where_required():
  """CI sets XLASERVE_REQUIRE_NATIVE=1: a missing extension must fail there, not fall back."""
  if os.environ.get("XLASERVE_REQUIRE_NATIVE") == "1":
    assert NATIVE is not None, WHY


def _slow_server(tmp_path, delay_s=0.3, **config):
  repo = tmp_path / "repo"
  # Seconds of deliberately queued work: without the default 1 s queue-wait bound.
  write_mock_bundle(repo, "mock", 1, config={"max_queue_wait_ms": 0})
  return serving(repo, mock_factory(delay_s=delay_s), **config)


def _rows(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.random((n, 4)).astype(np.float32), np.ones((n, 1), np.int32)


@needs_native
def test_deadlines_expire_in_the_queue(tmp_path):
  with _slow_server(tmp_path) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    first = stub.ModelInfer.future(mock_request(*_rows(8)))  # occupies the model for 0.3 s
    time.sleep(0.05)
    blocked = stub.ModelInfer.future(mock_request(*_rows(8)))  # queued behind it for the next batch
    resp, err = rpc_result(stub.ModelInfer, mock_request(*_rows(1), timeout=100_000))
    assert resp is None and err[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    # A gRPC deadline applies too (the client sees DEADLINE_EXCEEDED either way).
    assert rpc_result(stub.ModelInfer, mock_request(*_rows(1)), timeout=0.05)[1][0] == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    first.result(), blocked.result()
    assert bg.server.native.stats()["fast"] >= 3


@needs_native
def test_model_default_timeout_applies_without_a_timeout_parameter(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"default_timeout_us": 100_000})
  with serving(repo, mock_factory(delay_s=0.3)) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    first = stub.ModelInfer.future(mock_request(*_rows(8)))  # busy for 0.3 s
    time.sleep(0.05)
    queued = stub.ModelInfer.future(mock_request(*_rows(8), timeout=0))  # 0: no deadline
    err = rpc_result(stub.ModelInfer, mock_request(*_rows(1)))[1]
    assert err[0] == grpc.StatusCode.DEADLINE_EXCEEDED and "never executed" in err[1]
    assert rpc_result(stub.ModelInfer, mock_request(*_rows(1), timeout=0))[0] is not None
    first.result(), queued.result()
    assert bg.server.native.stats()["relayed"] == 0


@needs_native
def test_unload_with_queued_requests_answers_every_one(tmp_path):
  with _slow_server(tmp_path, delay_s=0.15) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    futs = [stub.ModelInfer.future(mock_request(*_rows(3, i))) for i in range(10)]
    time.sleep(0.05)
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mock"))
    codes = []
    for f in futs:
      try:
        f.result(timeout=10)
        codes.append(grpc.StatusCode.OK)
      except grpc.RpcError as e:
        codes.append(e.code())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    # Unloaded: the table no longer has it, so the Python servicer answers.
    after = rpc_result(stub.ModelInfer, mock_request(*_rows(1)))[1]
    assert after[0] == grpc.StatusCode.UNAVAILABLE and "no ready version" in after[1]
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mock"))
    fast = bg.server.native.stats()["fast"]
    assert outputs(stub.ModelInfer(mock_request(*_rows(2))))["y"].shape == (2, 1)
    assert bg.server.native.stats()["fast"] == fast + 1  # republished after the load


@needs_native
def test_new_version_is_published_and_old_one_stays_addressable(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1, config={"version_policy": "all"})
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert stub.ModelInfer(mock_request(*_rows(1))).model_version == "1"
    write_mock_bundle(repo, "mock", 2)
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mock"))
    fast = bg.server.native.stats()["fast"]
    assert stub.ModelInfer(mock_request(*_rows(1))).model_version == "2"
    assert stub.ModelInfer(mock_request(*_rows(1), version="1")).model_version == "1"
    assert stub.ModelInfer(mock_request(*_rows(1), version="2")).model_version == "2"
    assert bg.server.native.stats()["fast"] == fast + 3


@needs_native
def test_shutdown_answers_accepted_requests_then_refuses(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0,
                                            metrics_port=-1),
                               engine_factory=mock_factory(delay_s=0.2))).start()
  ch = grpc.insecure_channel(bg.address)
  stub = pb_grpc.GRPCInferenceServiceStub(ch)
  futs = [stub.ModelInfer.future(mock_request(*_rows(2, i))) for i in range(6)]
  time.sleep(0.05)
  stopper = threading.Thread(target=bg.stop)
  stopper.start()
  time.sleep(0.05)
  late = rpc_result(stub.ModelInfer, mock_request(*_rows(1)))[1]
  for f in futs:
    assert outputs(f.result(timeout=20))["y"].shape == (2, 1)
  stopper.join(30)
  assert late is not None and late[0] == grpc.StatusCode.UNAVAILABLE
  ch.close()


@needs_native
def test_auth_token_is_checked_on_the_fast_path(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  with serving(repo, mock_factory(), auth_token="tok-123") as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    req = mock_request(*_rows(2))
    relayed = bg.server.native.stats()["relayed"]
    want = (grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong credentials: send metadata 'authorization: Bearer <token>'")
    assert rpc_result(stub.ModelInfer, req)[1] == want
    assert rpc_result(stub.ModelInfer, req, metadata=[("authorization", "Bearer nope")])[1] == want
    assert bg.server.native.stats()["relayed"] == relayed  # refused in C++, not by Python
    fast = bg.server.native.stats()["fast"]
    ok = stub.ModelInfer(req, metadata=[("authorization", "Bearer tok-123")])
    assert outputs(ok)["y"].shape == (2, 1)
    assert bg.server.native.stats()["fast"] == fast + 1
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert bg.server.auth.denied == 2


@needs_native
def test_cancelled_and_finished_calls_release_their_state(tmp_path):
  with _slow_server(tmp_path, delay_s=0.1) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    baseline = bg.server.native.stats()["live_calls"]
    futs = [stub.ModelInfer.future(mock_request(*_rows(2, i))) for i in range(8)]
    futs += [stub.ModelInfer.future(mock_request(*_rows(2), model="nope")) for _ in range(4)]
    time.sleep(0.02)
    for f in futs[:4]:
      f.cancel()  # the runner still answers them; the C++ side drops the late answer
    for f in futs[4:]:
      try:
        f.result(timeout=10)
      except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    assert outputs(stub.ModelInfer(mock_request(*_rows(1))))["y"].shape == (1, 1)
    deadline = time.time() + 5
    while bg.server.native.stats()["live_calls"] > baseline and time.time() < deadline:
      time.sleep(0.05)
    st = bg.server.native.stats()
    assert st["live_calls"] == baseline and st["inflight"] == 0


def test_front_end_choice(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  kw = dict(model_repository=str(repo), grpc_port=0, metrics_port=-1)
  built = "native" if NATIVE is not None else "python"
  assert Server(ServerConfig(**kw), engine_factory=mock_factory()).frontend == built
  assert Server(ServerConfig(**kw, frontend="python"),
                engine_factory=mock_factory()).frontend == "python"
  tls = ServerConfig(**kw, tls_cert_file="cert.pem", tls_key_file="key.pem")
  assert Server(tls, engine_factory=mock_factory()).frontend == built  # TLS: the same server
  with pytest.raises(ValueError):
    ServerConfig(**kw, frontend="grpc")
