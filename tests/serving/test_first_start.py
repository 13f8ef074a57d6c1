"""A first demo start serves each model as soon as it is built: ModelReady and inference for the
models built so far, while the server's readiness (ServerReady, grpc.health, HTTP
/v2/health/ready) stays false until every one is loaded (demo/repository.py `DemoBuild`,
serving/server.py `startup`). The builders here write MockEngine bundles, so a "build" is instant
and a test decides when each one finishes; the slow part of a real first start (training,
export, compile) is measured by hand, not here.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from clientutil import assert_served_like
from demo.repository import demo_build
from serving.cli import _Heartbeat
from serving.server import BackgroundServer, Server, ServerConfig
from servingutil import mock_factory, mock_reference, mock_rows, write_mock_bundle

WAIT_S = 60


def _builder(name: str, *, gate: threading.Event | None = None, fail: bool = False,
             entered: threading.Event | None = None):
  """A demo builder (repository, *, tiny, platforms, progress) writing a MockEngine bundle
  `name`, after `gate` opens (`entered` set once it waits there); `fail` raises instead."""
  def build(repository, *, tiny, platforms, progress):
    if entered is not None:
      entered.set()
    if gate is not None:
      assert gate.wait(WAIT_S), f"{name}: the test never opened the gate"
    if fail:
      raise RuntimeError(f"{name}: out of disk (on purpose)")
    progress(f"{name}: exporting ...")
    return write_mock_bundle(repository, name)
  return build


class _Started:
  """The real server on a fresh demo repository whose models `builders` build at start-up."""

  def __init__(self, tmp_path, builders):
    self.lines: list[str] = []
    self.build = demo_build(self.lines.append, root=tmp_path, builders=builders)
    server = Server(
        ServerConfig(model_repository=str(self.build.repo), grpc_port=0, http_port=0,
                     metrics_port=-1),
        engine_factory=mock_factory(), progress=self.lines.append,
        startup=self.build.serve_on)  # as `xlaserve serve` wires it
    self.bg = BackgroundServer(server).start(WAIT_S, wait_loaded=False)
    self.server = server
    self.client = tc.InferenceServerClient(self.bg.address)

  def wait_model_ready(self, name: str) -> None:
    end = time.monotonic() + WAIT_S
    while not self.client.is_model_ready(name):
      assert time.monotonic() < end, f"{name} never became ready:\n" + "\n".join(self.lines)
      time.sleep(0.02)

  def health(self) -> int:
    with grpc.insecure_channel(self.bg.address) as ch:
      return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                  timeout=10).status

  def http_ready(self) -> int:
    try:
      return urllib.request.urlopen(
          f"http://127.0.0.1:{self.server.http_port}/v2/health/ready", timeout=10).status
    except urllib.error.HTTPError as e:
      return e.code

  def assert_not_ready(self) -> None:
    assert not self.client.is_server_ready()
    assert self.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    assert self.http_ready() == 400

  def assert_answers(self, name: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cases = [dict(zip(("x", "k"), mock_rows(rng, n))) for n in (1, 3)]
    assert assert_served_like(self.client, name, cases, mock_reference) == 2

  def stop(self) -> None:
    self.client.close()
    self.bg.stop()


def test_first_model_answers_while_the_rest_build_and_readiness_waits_for_all(tmp_path):
  gate = threading.Event()
  started = _Started(tmp_path, {"first": _builder("first"), "second": _builder("second", gate=gate)})
  try:
    assert started.build.names == ["first", "second"]
    started.wait_model_ready("first")
    # "second" is provably still being built (its builder waits on the gate): "first" answers,
    # the server as a whole is not ready on any protocol, "second" is not served yet.
    end = time.monotonic() + WAIT_S
    while started.build.current != "second":
      assert time.monotonic() < end and not gate.is_set()
      time.sleep(0.01)
    started.assert_answers("first", 0)
    started.assert_not_ready()
    assert not started.client.is_model_ready("second")
    with pytest.raises(InferenceServerException):
      started.assert_answers("second", 1)
    assert not started.server.loaded.is_set()
    gate.set()
    assert started.server.loaded.wait(WAIT_S)
    assert started.client.is_server_ready()
    assert started.health() == health_pb2.HealthCheckResponse.SERVING
    assert started.http_ready() == 200
    started.assert_answers("second", 2)
    started.assert_answers("first", 3)
  finally:
    started.stop()
  text = "\n".join(started.lines)
  assert text.index("first/1: READY") < text.index("building demo model 'second'"), text


def test_a_failed_build_keeps_the_server_unready_and_the_rest_serving(tmp_path):
  started = _Started(tmp_path, {"first": _builder("first"), "broken": _builder("broken", fail=True),
                                "last": _builder("last")})
  try:
    assert started.server.loaded.wait(WAIT_S)
    started.assert_answers("first", 0)
    started.assert_answers("last", 1)  # built after the failure
    started.assert_not_ready()
  finally:
    started.stop()
  text = "\n".join(started.lines)
  assert "building demo model 'broken' FAILED: RuntimeError" in text, text
  assert "start-up work failed" in text and "NOT ready" in text, text


def test_a_stop_during_a_first_start_builds_nothing_more(tmp_path):
  gate, entered = threading.Event(), threading.Event()
  started = _Started(tmp_path, {"first": _builder("first"),
                                "second": _builder("second", gate=gate, entered=entered),
                                "third": _builder("third")})
  try:
    started.wait_model_ready("first")
    assert entered.wait(WAIT_S)  # "second" is mid-build (else the stop could come before it)
    started.server.request_stop()  # SIGTERM's path: readiness false at once, then drain
    assert not started.client.is_server_ready()
    gate.set()  # "second" was mid-build: it finishes, "third" never starts
  finally:
    started.stop()
  text = "\n".join(started.lines)
  assert "stopping: third not built" in text and text.rstrip().endswith("stopped"), text
  assert not (started.build.repo / "third").exists()


def test_later_starts_build_only_what_is_missing(tmp_path):
  builders = {"first": _builder("first"), "second": _builder("second")}
  build = demo_build(lambda msg: None, root=tmp_path, builders=builders)
  build.run(lambda name: None)
  assert demo_build(lambda msg: None, root=tmp_path, builders=builders).names == []
  (build.repo / "second" / "1" / "manifest.json").unlink()  # as if killed mid-export
  (build.repo / "second" / "1" / "leftover").write_text("half-written")
  again = demo_build(lambda msg: None, root=tmp_path, builders=builders)
  assert again.repo == build.repo and again.names == ["second"]
  assert not (build.repo / "second").exists()  # the half-written export is gone


def test_heartbeat_says_what_is_running_while_lines_pause():
  lines, done = [], threading.Event()
  say = _Heartbeat(lines.append, quiet_s=0.2)
  say("started")
  say.watch(lambda: ["building demo model 'lm'"], done)
  end = time.monotonic() + 10
  while not any("still working" in line for line in lines):
    assert time.monotonic() < end, lines
    time.sleep(0.05)
  assert "building demo model 'lm'" in lines[-1]
  done.set()
  time.sleep(1.2)  # the heartbeat checks every second
  n = len(lines)
  time.sleep(1.2)
  assert len(lines) == n, lines[n:]
