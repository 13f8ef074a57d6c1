"""Hostile input against the real server: size limits (configurable, enforced before allocating) and
model names or versions that try to leave the repository."""

from __future__ import annotations

import os
import time

import grpc
import numpy as np
import psutil
import pytest

from serving import cli
from serving.frontend import codec
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import expected, mock_factory, mock_request, outputs, rpc_code, serving, \
    write_mock_bundle


def _call(address, req):
  with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 30)]) as ch:
    try:
      return grpc.StatusCode.OK, pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    except grpc.RpcError as e:
      return e.code(), e.details()


def _rows(n):
  return np.ones((n, 4), np.float32), np.ones((n, 1), np.int32)


def _still_serves(address):
  code, resp = _call(address, mock_request(*_rows(1)))
  assert code == grpc.StatusCode.OK
  np.testing.assert_array_equal(outputs(resp)["y"], [[9.0]])


def test_message_size_limit(mock_repo):
  engines = {}
  with serving(mock_repo, mock_factory(engines), max_message_bytes=64 << 10) as bg:
    ok, _ = _call(bg.address, mock_request(*_rows(2000)))  # about 40 KB
    code, details = _call(bg.address, mock_request(*_rows(4000)))  # about 80 KB
    assert ok == grpc.StatusCode.OK
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details
    assert sum(engines[("mock", 1)].batches) == 2000  # the big one never reached the model
    _still_serves(bg.address)


def test_rows_per_request_limit(mock_repo):
  with serving(mock_repo, mock_factory(), limits=codec.Limits(max_rows=16)) as bg:
    assert _call(bg.address, mock_request(*_rows(16)))[0] == grpc.StatusCode.OK
    code, details = _call(bg.address, mock_request(*_rows(17)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "17 rows exceed the limit of 16 per request" in details
    # ModelConfig tells clients the limit: Triton's max_batch_size is the most rows it accepts.
    with grpc.insecure_channel(bg.address) as ch:
      config = pb_grpc.GRPCInferenceServiceStub(ch).ModelConfig(
          pb.ModelConfigRequest(name="mock")).config
    assert config.max_batch_size == 16


def test_bytes_per_tensor_limit(mock_repo):
  with serving(mock_repo, mock_factory(), limits=codec.Limits(max_tensor_bytes=160)) as bg:
    assert _call(bg.address, mock_request(*_rows(10)))[0] == grpc.StatusCode.OK  # x: 160 B
    code, details = _call(bg.address, mock_request(*_rows(11)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x': 176 bytes exceed the limit of 160 per tensor" in details


def test_huge_claimed_shapes_are_refused_before_allocating(mock_repo):
  """Shapes claiming terabytes over a few bytes of payload: refused from the header alone."""
  limits = codec.Limits(max_rows=1 << 62)  # leave only the bytes limit (64 MiB) in the way
  engines = {}
  with serving(mock_repo, mock_factory(engines), limits=limits) as bg:
    rss0 = psutil.Process(os.getpid()).memory_info().rss
    cases = []
    for rows in (1 << 20, 1 << 40, (1 << 62) - 1):
      req = mock_request(*_rows(2))
      req.inputs[0].shape[:] = [rows, 4]
      req.inputs[1].shape[:] = [rows, 1]
      cases.append(req)
    typed = pb.ModelInferRequest(model_name="mock")  # typed contents claiming 16M values
    t = typed.inputs.add(name="x", datatype="FP32", shape=[1 << 22, 4])
    t.contents.fp32_contents.extend([1.0] * 4)
    t = typed.inputs.add(name="k", datatype="INT32", shape=[1 << 22, 1])
    t.contents.int_contents.extend([1])
    cases.append(typed)
    for req in cases:
      t0 = time.perf_counter()
      code, details = _call(bg.address, req)
      assert code == grpc.StatusCode.INVALID_ARGUMENT, details
      assert any(s in details for s in ("exceed the limit", "values in contents",
                                        "raw bytes, expected")), details
      assert time.perf_counter() - t0 < 1.0
    assert psutil.Process(os.getpid()).memory_info().rss - rss0 < 64 << 20
    assert engines[("mock", 1)].batches == []
    _still_serves(bg.address)


def test_limits_come_from_command_line_flags():
  args = cli.build_parser().parse_args([
      "serve", "--max-rows-per-request", "7", "--max-tensor-bytes", "4096",
      "--max-message-bytes", "65536", "--max-queue-rows", "512", "--max-queue-requests", "9",
      "--default-timeout-us", "250000", "--repository-poll-s", "2.5"])
  cfg = cli.server_config(args, "/tmp", None)
  assert cfg.limits == codec.Limits(max_rows=7, max_tensor_bytes=4096)
  assert cfg.max_message_bytes == 65536 and cfg.repository_poll_s == 2.5
  m = cfg.default_model_config
  assert (m.max_queue_rows, m.max_queue_requests, m.default_timeout_us) == (512, 9, 250000)
  with pytest.raises(ValueError, match="max_message_bytes"):
    cli.server_config(cli.build_parser().parse_args(["serve", "--max-message-bytes", "10"]),
                      "/tmp", None)


TRAVERSAL_NAMES = [
    "../outside", "..", ".", "/", "", "mock/../mock", "mock/1", "../repo/mock",
    "..%2foutside", "%2e%2e%2foutside", "..\\outside", "~", "outside\n", "mock\x00",
    "\uff4dock", "a" * 200, "-",
]


def test_model_names_never_reach_outside_the_repository(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  write_mock_bundle(tmp_path, "outside", 1)  # a valid bundle next to the repository
  paths = []

  def factory(path, manifest, cfg):
    paths.append(path)
    return mock_factory()(path, manifest, cfg)

  with serving(repo, factory) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    x, k = _rows(1)
    for name in TRAVERSAL_NAMES + [str(tmp_path / "outside"), str(tmp_path)]:
      calls = {
          "infer": (stub.ModelInfer, mock_request(x, k, model=name)),
          "ready": (stub.ModelMetadata, pb.ModelMetadataRequest(name=name)),
          "config": (stub.ModelConfig, pb.ModelConfigRequest(name=name)),
          "stats": (stub.ModelStatistics, pb.ModelStatisticsRequest(name=name or "-")),
          "load": (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
          "unload": (stub.RepositoryModelUnload,
                     pb.RepositoryModelUnloadRequest(model_name=name)),
      }
      for what, (fn, req) in calls.items():
        code = rpc_code(fn, req)
        want = {grpc.StatusCode.INVALID_ARGUMENT} if what in ("load", "unload") else {
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        assert code in want, (name, what, code)
      assert not stub.ModelReady(pb.ModelReadyRequest(name=name)).ready
    for version in ("../1", "1/../../outside", "%2e%2e", "-1", "0", "1e3", "0x1", " ", "1 2"):
      code = rpc_code(stub.ModelInfer, mock_request(x, k, version=version))
      assert code == grpc.StatusCode.INVALID_ARGUMENT, version
    # Loading parameters (Triton's inline config and file uploads) are refused outright.
    req = pb.RepositoryModelLoadRequest(model_name="mock")
    req.parameters["file:1/model.bin"].bytes_param = b"\0" * 16
    assert rpc_code(stub.RepositoryModelLoad, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert not (repo / "mock" / "1" / "model.bin").exists()
    assert [str(p) for p in paths] == [str(repo.resolve() / "mock" / "1")]
    assert [r.name for r in bg.server.repository.records()] == ["mock"]
    _still_serves(bg.address)


def test_symlinked_model_leading_outside_is_refused_and_isolated(tmp_path):
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  write_mock_bundle(tmp_path / "elsewhere", "escape", 1)
  (repo / "escape").symlink_to(tmp_path / "elsewhere" / "escape", target_is_directory=True)
  with serving(repo, mock_factory()) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    idx = {m.name: (m.state, m.reason) for m in
           stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert idx["escape"][0] == "UNAVAILABLE" and "outside the repository" in idx["escape"][1]
    assert rpc_code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(
        model_name="escape")) == grpc.StatusCode.INVALID_ARGUMENT
    x, k = _rows(3)
    np.testing.assert_array_equal(outputs(stub.ModelInfer(mock_request(x, k)))["y"],
                                  expected(x, k)[0])
