"""`xlaserve profile` against the real server: the stage breakdown of live traffic, the
jax.profiler trace, and the admin endpoint's refusals."""

import gzip
import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tg

from serving import http_client, profile_cli
from serving.telemetry.profile import busy_seconds
from servingutil import mock_rows

DELAY_S = 0.004  # the mock engine's compute time per batch


def test_busy_seconds_is_the_union_of_intervals():
  rng = np.random.default_rng(0)
  starts = rng.uniform(0, 10, 40)
  intervals = [(s, s + d) for s, d in zip(starts, rng.uniform(0, 0.6, 40))]
  grid = np.linspace(-1, 12, 130_001)  # brute force: the share of grid points covered
  covered = np.zeros_like(grid, dtype=bool)
  for s, e in intervals:
    covered |= (grid >= s) & (grid < e)
  lo, hi = 1.0, 9.0
  inside = (grid >= lo) & (grid < hi)
  expect = covered[inside].mean() * (hi - lo)
  assert busy_seconds(intervals, lo, hi) == pytest.approx(expect, abs=2e-3)
  assert busy_seconds([], lo, hi) == 0.0


def _load(address: str, stop: threading.Event, done: list) -> None:
  rng = np.random.default_rng(threading.get_ident() % 1000)
  with tg.InferenceServerClient(address) as c:
    while not stop.is_set():
      x, k = mock_rows(rng, 2)
      ins = [tg.InferInput("x", list(x.shape), "FP32"), tg.InferInput("k", list(k.shape), "INT32")]
      ins[0].set_data_from_numpy(x)
      ins[1].set_data_from_numpy(k)
      y = c.infer("mock", ins).as_numpy("y")
      np.testing.assert_allclose(y, 2 * x.sum(1, keepdims=True) + 1, rtol=1e-6)
      done.append(time.perf_counter())


def _answered_in_windows(done: list, t0: float, t1: float, w: float) -> tuple[int, int]:
  """(fewest, most) client answers in any window of `w` seconds inside [t0, t1]."""
  times = np.sort([d for d in done if t0 <= d <= t1])
  starts = np.linspace(t0, t1 - w, 200)
  counts = np.searchsorted(times, starts + w) - np.searchsorted(times, starts)
  return int(counts.min()), int(counts.max())


def test_profile_breaks_down_live_traffic(start_mock_server, tmp_path, capsys):
  bg, _ = start_mock_server(delay_s=DELAY_S, server_kwargs={
      "http_port": 0, "frontend": "python", "profile_dir": str(tmp_path / "traces")})
  url = f"http://127.0.0.1:{bg.server.http_port}"
  with pytest.raises(RuntimeError, match="HTTP 404: no profile captured yet"):
    http_client.call(url, "GET", "/v2/admin/profile/trace")
  with pytest.raises(RuntimeError, match="HTTP 400: 'seconds' must be"):
    http_client.call(url, "POST", "/v2/admin/profile", body=b'{"seconds": -1}')
  stop, done = threading.Event(), []
  clients = [threading.Thread(target=_load, args=(bg.address, stop, done)) for _ in range(3)]
  for t in clients:
    t.start()
  try:
    time.sleep(0.5)
    seen = len(done)
    t0 = time.perf_counter()
    args = profile_cli.build_args(["--url", url, "--seconds", "1.5", "--out",
                                   str(tmp_path / "out")])
    assert profile_cli.main(args) == 0
    t1 = time.perf_counter()
  finally:
    stop.set()
    for t in clients:
      t.join()
  assert len(done) > seen
  report = json.loads((tmp_path / "out" / "profile.json").read_text())
  m = report["models"]["mock v1"]
  # The capture's window lies somewhere in [t0, t1]: it saw as many requests as the clients had
  # answered in some window of its length there, give or take those in flight.
  lo, hi = _answered_in_windows(done, t0, t1, report["window_s"])
  assert 0.5 * lo <= m["requests"] <= hi + len(clients)
  assert m["rows"] == pytest.approx(2 * m["requests"], abs=2 * len(clients))
  st = m["stages"]
  assert DELAY_S <= st["compute"]["p50"] < DELAY_S + 0.05  # the engine sleeps DELAY_S per batch
  assert st["compute"]["count"] == m["batches"] >= 10
  assert st["queue"]["count"] >= 0.5 * m["requests"]
  assert st["front_end"]["count"] >= 0.5 * m["requests"]  # the Python front end times it
  for stage in ("front_end", "queue", "assembly", "encode"):
    assert 0 <= st[stage]["p50"] <= st[stage]["p99"] < 1.0
  # Three closed-loop clients keep a batch in flight nearly always: the device is mostly busy.
  assert 0.5 < m["busy_fraction"] <= 1.0
  out = capsys.readouterr().out
  assert "mock v1:" in out and "compute" in out and "=>" in out
  trace = json.loads(gzip.decompress((tmp_path / "out" / "perfetto_trace.json.gz").read_bytes()))
  assert trace.get("traceEvents")


def test_one_capture_at_a_time_and_the_native_path(start_mock_server):
  bg, _ = start_mock_server(server_kwargs={"http_port": 0})
  url = f"http://127.0.0.1:{bg.server.http_port}"
  first = threading.Thread(target=http_client.call, args=(url, "POST", "/v2/admin/profile"),
                           kwargs={"body": b'{"seconds": 1.0, "trace": false}'})
  first.start()
  time.sleep(0.3)
  try:
    with pytest.raises(RuntimeError, match="HTTP 409: a profile capture is already running"):
      http_client.call(url, "POST", "/v2/admin/profile", body=b'{"seconds": 0.1}')
  finally:
    first.join()
  report = http_client.call_json(url, "POST", "/v2/admin/profile",
                                 body=b'{"seconds": 0.2, "trace": false}')
  assert report["models"] == {} and report["trace_dir"] is None
  # The native front end's requests (parsed and queued in C++) are profiled from the queue on.
  stop, done = threading.Event(), []
  load = threading.Thread(target=_load, args=(bg.address, stop, done))
  load.start()
  try:
    report = http_client.call_json(url, "POST", "/v2/admin/profile",
                                   body=b'{"seconds": 0.5, "trace": false}')
  finally:
    stop.set()
    load.join()
  st = report["models"]["mock v1"]["stages"]
  assert st["queue"]["count"] > 0 and st["compute"]["count"] > 0 and st["encode"]["count"] > 0
