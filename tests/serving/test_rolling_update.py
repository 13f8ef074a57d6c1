"""A rolling update, proven on two real `xlaserve serve` processes behind a round-robin client.

Senders (unmodified tritonclient.grpc and tritonclient.http) keep sending to replicas A and B in
turn while A gets SIGTERM; like a Kubernetes Service, the client takes a replica out of rotation
once a readiness probe of it fails (and, until then, retries what it refused). Proven: A's readiness (grpc.health, Triton's ServerReady,
/v2/health/ready) turns false before its ports close; every request A accepted is answered (the
count of ModelInfer calls its native front end accepted equals the gRPC answers the client got
from A, and no HTTP request fails); the client sees no failure, retrying on B only what A refused
before accepting it (UNAVAILABLE, 503, or a refused connection once the port is closed), and
every answer equals a numpy reference; A exits 0. Requests wait in the queue (config.json: a
500 ms batching delay, no dispatch when idle), so some are queued in A when the signal lands.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable

import grpc
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from procutil import SERVE, Proc, child_env

MODEL = "affine"
QUEUE_DELAY_S = 0.5  # every request waits this long in the queue (dispatch_when_idle: false)
ENDPOINT_LAG_S = 1.0  # a replica leaves the client's rotation this long after a failed probe
DRAIN_QUIET_S = 2.0  # the server's --drain-quiet-s: longer than that lag
RNG = np.random.default_rng(13)
W = RNG.integers(-4, 5, size=(16, 4)).astype(np.float32)  # integers: x @ W + B is exact in f32
B = RNG.integers(-9, 10, size=(4,)).astype(np.float32)
READY, NOT_READY, NO_ANSWER = "ready", "not ready", "no answer"


def reference(x: np.ndarray) -> np.ndarray:
  """The model's answer, worked by numpy."""
  return x @ W + B


def export_affine(repo) -> None:
  """`affine` v1: y = x @ W + B for x FP32 [batch, 16]; requests wait QUEUE_DELAY_S to batch."""
  import jax.numpy as jnp

  import export

  export.export_model(lambda p, inputs: {"y": jnp.dot(inputs["x"], p["w"]) + p["b"]},
                      params={"w": W, "b": B}, repository=repo, name=MODEL,
                      inputs=[export.Input("x", "float32", ("batch", 16))],
                      config=export.ExportConfig(batch_buckets=(1, 8, 64)))
  (repo / MODEL / "config.json").write_text(json.dumps(
      {"max_queue_delay_us": int(QUEUE_DELAY_S * 1e6), "dispatch_when_idle": False}))


@dataclasses.dataclass(frozen=True)
class Replica:
  name: str
  proc: Proc
  grpc: str  # host:port
  http: str  # host:port


class Refused(Exception):
  """Refused before being accepted: UNAVAILABLE, HTTP 503 'shutting down', connection refused."""


def grpc_send(replicas: list[Replica]) -> Callable[[Replica, np.ndarray], np.ndarray]:
  clients = {r.name: tg.InferenceServerClient(r.grpc) for r in replicas}

  def send(r: Replica, x: np.ndarray) -> np.ndarray:
    i = tg.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    try:
      return clients[r.name].infer(MODEL, [i], client_timeout=60).as_numpy("y")
    except InferenceServerException as e:
      if e.status() == "StatusCode.UNAVAILABLE":
        raise Refused(e.message()) from e
      raise
  return send


def http_send(replicas: list[Replica]) -> Callable[[Replica, np.ndarray], np.ndarray]:
  clients = {r.name: th.InferenceServerClient(r.http, network_timeout=60) for r in replicas}

  def send(r: Replica, x: np.ndarray) -> np.ndarray:
    i = th.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    try:
      return clients[r.name].infer(MODEL, [i]).as_numpy("y")
    except InferenceServerException as e:
      if e.status() == "503" and "shutting down" in e.message():
        raise Refused(e.message()) from e
      raise
    except ConnectionRefusedError as e:
      raise Refused(str(e)) from e
  return send


class RoundRobin:
  """The client: each request goes to the next replica in rotation; one refused before it was
  accepted is retried on the next replica; anything else is a failure. A replica whose readiness
  probe failed leaves the rotation (`leave`), as endpoints leave a Kubernetes Service. Records
  every outcome."""

  def __init__(self, replicas: list[Replica]):
    self.replicas = replicas
    self.leaves: dict[str, float] = {}  # replica -> when it leaves the rotation
    self.stop = threading.Event()
    self.lock = threading.Lock()
    self.answers: list[tuple[str, str, float, float]] = []  # (replica, protocol, sent, answered)
    self.refusals: list[tuple[str, str, str]] = []  # (replica, protocol, why)
    self.failures: list[str] = []
    self.outstanding: dict[int, tuple[str, float]] = {}  # call -> (replica, sent)
    self._turn = itertools.count()
    self._calls = itertools.count()
    self._threads: list[threading.Thread] = []

  def leave(self, name: str) -> None:
    """Its readiness probe failed: the replica leaves the rotation ENDPOINT_LAG_S later (an
    endpoint controller's lag; requests sent meanwhile are refused and retried)."""
    with self.lock:
      self.leaves.setdefault(name, time.monotonic() + ENDPOINT_LAG_S)

  def _rotation(self) -> list[Replica]:
    now = time.monotonic()
    return [r for r in self.replicas if now < self.leaves.get(r.name, now + 1)] or self.replicas

  def call(self, send: Callable, protocol: str, x: np.ndarray) -> np.ndarray:
    first = next(self._turn)
    for attempt in range(2 * len(self.replicas)):
      with self.lock:
        rotation = self._rotation()
        r = rotation[(first + attempt) % len(rotation)]
      key, sent = next(self._calls), time.monotonic()
      with self.lock:
        self.outstanding[key] = (r.name, sent)
      try:
        y = send(r, x)
      except Refused as e:
        with self.lock:
          self.refusals.append((r.name, protocol, str(e)))
        continue
      finally:
        with self.lock:
          del self.outstanding[key]
      with self.lock:
        self.answers.append((r.name, protocol, sent, time.monotonic()))
      return y
    raise AssertionError(f"refused by every replica {2 * len(self.replicas)} times")

  def _sender(self, make_send: Callable, protocol: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    try:
      send = make_send(self.replicas)
    except Exception as e:  # noqa: BLE001  (recorded: the test fails on it)
      self.failures.append(f"{protocol} client: {e!r}")
      return
    while not self.stop.is_set():
      x = rng.integers(-8, 9, size=(int(rng.integers(1, 5)), 16)).astype(np.float32)
      try:
        np.testing.assert_array_equal(self.call(send, protocol, x), reference(x))
      except Exception as e:  # noqa: BLE001  (any error or wrong answer is a failure)
        with self.lock:
          self.failures.append(f"{protocol}: {type(e).__name__}: {e}")

  def start(self, grpc_senders: int, http_senders: int) -> None:
    kinds = [(grpc_send, "grpc")] * grpc_senders + [(http_send, "http")] * http_senders
    for seed, (make_send, protocol) in enumerate(kinds):
      t = threading.Thread(target=self._sender, args=(make_send, protocol, seed), daemon=True)
      t.start()
      self._threads.append(t)

  def finish(self) -> None:
    self.stop.set()
    for t in self._threads:
      t.join(60)
      assert not t.is_alive(), "a sender is stuck"

  def count(self, replica: str, protocol: str | None = None, after: float = 0.0) -> int:
    with self.lock:
      return sum(1 for r, p, _, done in self.answers
                 if r == replica and protocol in (None, p) and done > after)


def port_open(address: str) -> bool:
  host, port = address.rsplit(":", 1)
  try:
    socket.create_connection((host, int(port)), timeout=10).close()
    return True
  except ConnectionRefusedError:
    return False


class ReadinessWatch:
  """Polls one replica until its process exits: (grpc.health, ServerReady, /v2/health/ready,
  gRPC port open, HTTP port open) per observation, in order."""

  def __init__(self, r: Replica, on_not_ready: Callable[[str], None]):
    self.r = r
    self.on_not_ready = on_not_ready  # called once a probe has not said ready
    self.seen: list[tuple[str, str, str, bool, bool]] = []
    self.error: BaseException | None = None
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _observe(self, health, triton) -> tuple[str, str, str, bool, bool]:
    try:
      s = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
      g = READY if s == health_pb2.HealthCheckResponse.SERVING else NOT_READY
    except grpc.RpcError:
      g = NO_ANSWER
    try:
      t = READY if triton.is_server_ready(client_timeout=10) else NOT_READY
    except InferenceServerException:
      t = NO_ANSWER
    try:
      urllib.request.urlopen(f"http://{self.r.http}/v2/health/ready", timeout=10).close()
      h = READY
    except urllib.error.HTTPError:
      h = NOT_READY
    except OSError:
      h = NO_ANSWER
    return g, t, h, port_open(self.r.grpc), port_open(self.r.http)

  def _run(self) -> None:
    try:
      with grpc.insecure_channel(self.r.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        triton = tg.InferenceServerClient(self.r.grpc)
        while True:
          exited = self.r.proc.p.poll() is not None
          self.seen.append(self._observe(health, triton))
          if self.seen[-1][:3] != (READY,) * 3:
            self.on_not_ready(self.r.name)
          if exited:
            return
          time.sleep(0.002 if self.seen[-1][3] or self.seen[-1][4] else 0.05)  # slower once closed
    except BaseException as e:  # surfaced by the test
      self.error = e

  def start(self) -> ReadinessWatch:
    self._thread.start()
    return self

  def join(self) -> None:
    self._thread.join(60)
    assert not self._thread.is_alive() and self.error is None, self.error


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
  end = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < end, f"timed out waiting for {what}"
    time.sleep(0.005)


def start_replicas(repo) -> list[Replica]:
  """Two `xlaserve serve` processes over `repo`, started together; killed if either fails."""
  procs = [Proc([*SERVE, "--model-repository", str(repo), "--grpc-port", "0",
                 "--http-port", "0", "--metrics-port", "-1", "--compile-cache", "none",
                 "--drain-quiet-s", str(DRAIN_QUIET_S)],
                env=child_env()) for _ in range(2)]
  try:
    for p in procs:
      p.wait_serving(180)
  except BaseException:
    for p in procs:
      p.kill()
    raise
  return [Replica(name, p, p.address, p.http_url.split("://", 1)[1])
          for name, p in zip("AB", procs)]


def queued_in(client: RoundRobin, name: str) -> bool:
  """At least two requests outstanding at `name`, every one sent 30..200 ms ago: they are in
  its queue (arrived, none dispatched yet), and stay there for another QUEUE_DELAY_S - 0.2 s."""
  now = time.monotonic()
  with client.lock:
    ages = [now - sent for r, sent in client.outstanding.values() if r == name]
  return len(ages) >= 2 and all(0.03 <= a <= 0.2 for a in ages)


def test_rolling_update_loses_no_request(tmp_path):
  export_affine(tmp_path / "repo")
  a, b = replicas = start_replicas(tmp_path / "repo")
  client = RoundRobin(replicas)
  try:
    client.start(grpc_senders=4, http_senders=2)
    wait(lambda: all(client.count(r.name, p) >= 3 for r in replicas for p in ("grpc", "http")),
         60, "answers from both replicas over both protocols")
    watch = ReadinessWatch(a, client.leave).start()
    wait(lambda: bool(watch.seen), 30, "a first readiness observation")
    wait(lambda: queued_in(client, a.name), 30, "requests queued in A")
    t_signal = time.monotonic()
    a.proc.p.send_signal(signal.SIGTERM)
    a_code = a.proc.wait(60)
    t_exit = time.monotonic()
    watch.join()
    wait(lambda: client.count(b.name, after=t_exit) >= 6, 60, "B answering after A exited")
    client.finish()
    b.proc.p.send_signal(signal.SIGTERM)
    b_code = b.proc.wait(60)
  finally:
    client.stop.set()
    for r in replicas:
      r.proc.kill()
  a_log = a.proc.output(10)
  drained = sum(1 for r, _, sent, done in client.answers
                if r == a.name and sent < t_signal < done)
  reasons = sorted({why for _, _, why in client.refusals})
  summary = (f"answers {len(client.answers)} (A {client.count(a.name)}, B {client.count(b.name)}),"
             f" A answers sent before and received after SIGTERM {drained},"
             f" refusals retried {len(client.refusals)}: {reasons},"
             f" A's readiness (health, ServerReady, HTTP ready, gRPC port, HTTP port) x count:"
             f" {runs(watch.seen)}")
  print(summary)

  # (c) no failure: every request answered, every answer equal to numpy's
  assert not client.failures, f"{client.failures[:5]}\n{summary}"
  assert all(r == a.name for r, _, _ in client.refusals), client.refusals  # B never refused
  # (d) A exits 0 after a graceful drain (B too)
  assert a_code == 0 and "stopped" in a_log, a_log
  assert b_code == 0, b.proc.text
  # (a) readiness false on all three probes before A's ports close, and never back
  assert_readiness_before_close(watch.seen)
  # (b) every request A accepted was answered: the native front end's count of the ModelInfer
  # calls it accepted equals the gRPC answers the client got from A (a request accepted and then
  # failed with UNAVAILABLE would be retried on B, unseen by the client, but not by this count);
  # and the signal found requests in A's queue, answered during the drain
  if "gRPC front end: native" in a_log:
    m = re.search(r"native front end: (\d+) requests served natively", a_log)
    assert m, a_log
    assert int(m.group(1)) == client.count(a.name, "grpc"), f"{m.group(0)}\n{summary}"
  assert drained >= 1, summary


def runs(seen: list) -> list[tuple[object, int]]:
  """Consecutive equal observations as (observation, count)."""
  return [(obs, len(list(group))) for obs, group in itertools.groupby(seen)]


def assert_readiness_before_close(seen: list[tuple[str, str, str, bool, bool]]) -> None:
  """Checks the watch's observations: ready at first; then all three probes answer 'not ready'
  (so through open ports) before either port refuses a connection; no probe is ready again."""
  table = "\n".join(map(str, seen))
  assert seen[0] == (READY, READY, READY, True, True), table
  closed = [i for i, (*_, grpc_open, http_open) in enumerate(seen)
            if not (grpc_open and http_open)]
  assert closed and not seen[-1][3] and not seen[-1][4], f"A's ports never closed:\n{table}"
  not_ready = [i for i, obs in enumerate(seen) if obs[:3] == (NOT_READY,) * 3]
  assert not_ready and not_ready[0] <= closed[0], f"not ready only after the port closed:\n{table}"
  for probe in range(3):
    first = next(i for i, obs in enumerate(seen) if obs[probe] != READY)
    assert all(obs[probe] != READY for obs in seen[first:]), table
