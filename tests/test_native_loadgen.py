"""The C++ load generator (benchmarks/native_loadgen.cc) against a real server on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from clientutil import serving, write_engine_bundle
from serving.engines.mock import MockEngine


def _grpcpp_missing() -> str:
  if shutil.which("g++") is None or shutil.which("pkg-config") is None:
    return "g++ or pkg-config not installed"
  if subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
    return "grpc++ not found by pkg-config (install libgrpc++-dev)"
  return ""


@pytest.mark.skipif(bool(_grpcpp_missing()), reason=_grpcpp_missing() or "grpc++ found")
def test_native_loadgen_closed_and_open_loop_against_mock_server(tmp_path):
  from benchmarks import loadgen, native_loadgen

  write_engine_bundle(tmp_path / "repo", "mock", MockEngine())
  with serving(tmp_path / "repo", lambda path, m, cfg: MockEngine(buckets=m.batch_buckets)) as bg:
    addr = bg.address
    x = np.ones((2, 4), np.float32)
    k = np.full((2, 1), 3, np.int32)
    good = loadgen.build_request("mock", {"x": x, "k": k})
    closed = native_loadgen.run_load(addr, good, rows_per_request=2, concurrency=4, processes=2,
                                     duration=1.0, warmup=0.2)
    assert closed.errors == {} and closed.ok > 0
    assert len(closed.latencies_s) == closed.ok and closed.rows_per_s == 2 * closed.ok / 1.0
    assert 0 < closed.pct_ms(50) <= closed.pct_ms(99) < 10_000

    opened = native_loadgen.run_load(addr, good, rows_per_request=2, rate=50.0, duration=1.0,
                                     warmup=0.2)
    assert opened.errors == {} and abs(opened.ok - 50) <= 1  # one per scheduled slot

    unknown = loadgen.build_request("no_such_model", {"x": x, "k": k})
    bad = native_loadgen.run_load(addr, unknown, rows_per_request=2, concurrency=2,
                                  duration=0.5, warmup=0.1)
    assert bad.ok == 0 and set(bad.errors) == {"NOT_FOUND"} and bad.errors["NOT_FOUND"] > 0
    assert len(bad.error_latencies_s["NOT_FOUND"]) == bad.errors["NOT_FOUND"]


def _gxx_missing() -> str:
  return "" if shutil.which("g++") else "g++ not installed"


@pytest.mark.skipif(bool(_gxx_missing()), reason=_gxx_missing() or "g++ found")
def test_native_http_loadgen_against_the_server(tmp_path):
  """KServe v2 binary-tensor requests (tritonclient.http's body) over keep-alive connections:
  every answer is counted once with the gRPC code of its HTTP status."""
  from benchmarks import native_http_loadgen

  write_engine_bundle(tmp_path / "repo", "mock", MockEngine())
  with serving(tmp_path / "repo", lambda path, m, cfg: MockEngine(buckets=m.batch_buckets),
               http_port=0) as bg:
    addr = f"127.0.0.1:{bg.server.http_port}"
    x, k = np.ones((2, 4), np.float32), np.full((2, 1), 3, np.int32)
    good = native_http_loadgen.http_request("mock", {"x": x, "k": k})
    closed = native_http_loadgen.run_load(addr, good, rows_per_request=2, concurrency=4,
                                          duration=1.0, warmup=0.2)
    assert closed.errors == {} and closed.ok > 0
    assert len(closed.latencies_s) == closed.ok and 0 < closed.pct_ms(50) <= closed.pct_ms(99)

    opened = native_http_loadgen.run_load(addr, good, rows_per_request=2, rate=50.0,
                                          duration=1.0, warmup=0.2)
    assert opened.errors == {} and abs(opened.ok - 50) <= 1  # one per scheduled slot

    unknown = native_http_loadgen.http_request("no_such_model", {"x": x, "k": k})
    bad = native_http_loadgen.run_load(addr, unknown, rows_per_request=2, concurrency=2,
                                       duration=0.5, warmup=0.1)
    assert bad.ok == 0 and set(bad.errors) == {"NOT_FOUND"} and bad.errors["NOT_FOUND"] > 0

    wrong = native_http_loadgen.http_request("mock", {"x": np.ones((2, 5), np.float32), "k": k})
    refused = native_http_loadgen.run_load(addr, wrong, rows_per_request=2, concurrency=2,
                                           duration=0.5, warmup=0.1)
    assert refused.ok == 0 and set(refused.errors) == {"INVALID_ARGUMENT"}
