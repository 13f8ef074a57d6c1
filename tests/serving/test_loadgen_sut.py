"""MLPerf LoadGen (the unmodified `mlperf_loadgen` package) drives the real server through
benchmarks/slo_sut.py, as benchmarks/slo.py does: every query LoadGen issues is answered and
counted, a light load is VALID at its bound, and a load beyond the model's capacity is not."""

import os
import time

import numpy as np
import pytest

from benchmarks.loadgen import build_request
from servingutil import mock_factory, serving, write_mock_bundle

lg = pytest.importorskip("mlperf_loadgen")

from benchmarks import native_http_loadgen, native_loadgen, native_sut  # noqa: E402
from benchmarks.slo_sut import (  # noqa: E402
    CpuMeter, GrpcSut, InProcessSut, NativeSut, loadgen_run)

BUILDERS = {"native": native_sut, "native-process": native_loadgen, "http": native_http_loadgen}


def _client(name: str):
  if name in BUILDERS:
    built, why = BUILDERS[name].available()
    if built is None:
      pytest.skip(f"the C++ client does not build here: {why.splitlines()[0]}")
    return InProcessSut if name == "native" else NativeSut
  return GrpcSut


@pytest.mark.parametrize("client", ["native", "native-process", "http", "python"])
def test_loadgen_server_scenario_against_the_server(tmp_path, client):
  write_mock_bundle(tmp_path / "repo", "mock", 1, config={"latency_slo_ms": 500,
                                                          "instance_count": 1})
  # LoadGen's early stopping needs several hundred queries to call a p99 VALID.
  inputs = {"x": np.ones((8, 4), np.float32), "k": np.ones((8, 1), np.int32)}
  payload = (native_http_loadgen.http_request("mock", inputs) if client == "http"
             else build_request("mock", inputs))
  with serving(tmp_path / "repo", mock_factory(delay_s=0.002), http_port=0) as bg, \
      _client(client)(f"127.0.0.1:{bg.server.http_port}" if client == "http" else bg.address,
                      payload) as sut:
    sat = sut.closed_loop(8, 1.0)
    assert 250 < sat < 505  # one 8-row batch per 2 ms: 500 requests/s at most
    # The server runs in this process here: its CPU and LoadGen's are the same counter.
    light = loadgen_run(sut, 200.0, 500.0, 3.0, tmp_path / "light", CpuMeter(sut, os.getpid()))
    assert light["queries"] >= 600 and light["failed"] == 0, light
    cpu = light["cpu_us"]  # every party did some work for each query; a child client too
    child = client in ("native-process", "http")
    assert cpu["server"] > 0 and cpu["loadgen"] > 0 and (cpu["client"] > 0) == child
    assert light["loadgen"] == "VALID" and light["valid"] and light["p99_ms"] < 500, light
    heavy = loadgen_run(sut, 1500.0, 500.0, 0.8, tmp_path / "heavy")
    assert heavy["queries"] >= 1200  # every query answered, shed ones included
    assert heavy["failed"] > 0.3 * heavy["queries"]  # 3x capacity: the excess is shed
    assert not heavy["valid"]  # and shedding does not make the run count as valid


def test_the_in_process_client_cancels_calls_the_server_does_not_answer(tmp_path):
  """A server that stops answering cannot hang LoadGen: calls in flight past the client's
  timeout come back CANCELLED, every one of them, and closing returns."""
  _client("native")
  # No queue-wait bound: the server's default (1 s) would shed the calls queued behind the first
  # batch (RESOURCE_EXHAUSTED) in a race with the client's 1 s timeout.
  write_mock_bundle(tmp_path / "repo", "mock", 1,
                    config={"instance_count": 1, "max_queue_wait_ms": 0})
  inputs = {"x": np.ones((1, 4), np.float32), "k": np.ones((1, 1), np.int32)}
  with serving(tmp_path / "repo", mock_factory(delay_s=4.0)) as bg:
    sut = InProcessSut(bg.address, build_request("mock", inputs), timeout_s=1.0)
    done: list[int] = []
    with sut:
      sut.on_done = done.extend
      sut.send([7, 8, 9])
      deadline = time.monotonic() + 3.5  # the timeout, the once-a-second sweep, and slack
      while len(done) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(done) == [7, 8, 9]
    assert [code for _, code in sut.records] == ["CANCELLED"] * 3
    assert all(1.0 <= seconds < 3.5 for seconds, _ in sut.records), sut.records
