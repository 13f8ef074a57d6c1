"""Tests that start other processes (`xlaserve serve`, multi-host workers): the environment a child
needs, its output collected on a thread, and every wait bounded.

For every test folder (`from procutil import ...`: tests/ is on sys.path, put there by pytest's
default import mode as the folder of tests/conftest.py).
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SERVE = (sys.executable, "-m", "serving.cli", "serve")  # `xlaserve serve`, from this checkout


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for a coordinator address)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(*, own_devices: bool = False, **extra: str) -> dict[str, str]:
  """This process's environment for a child on CPU, unbuffered, importing this checkout.

  `own_devices`: drop the forced host device count (tests/conftest.py sets 8) so the child sets
  its own (`--local-devices`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  if own_devices:
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
  return env


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  """`xlaserve serve ARGS` to completion (for flags that exit at once), output captured."""
  return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout,
                        cwd=REPO_ROOT, env=child_env())


class Proc:
  """A child process whose output (stdout and stderr) is collected line by line on a thread, so
  a test can wait for a line with a bound and show everything the child said when it fails."""

  def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
               cwd: pathlib.Path | str = REPO_ROOT):
    self.p = subprocess.Popen(args, cwd=cwd, env=env or child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self.closed = False  # stdout reached its end
    self.address: str | None = None  # set by wait_serving
    self.metrics_url: str | None = None
    self.http_url: str | None = None  # http(s)://host:port of the HTTP/REST front end, if any
    self._cv = threading.Condition()
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self) -> None:
    for line in self.p.stdout:
      with self._cv:
        self.lines.append(line)
        self._cv.notify_all()
    with self._cv:
      self.closed = True
      self._cv.notify_all()

  @property
  def text(self) -> str:
    with self._cv:
      return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
    """The first match of `pattern` in the output, waiting at most `timeout` s (None: the child
    closed its output, or time ran out, without printing it)."""
    deadline = time.monotonic() + timeout
    with self._cv:
      while True:
        m = re.search(pattern, "".join(self.lines))
        left = deadline - time.monotonic()
        if m or self.closed or left <= 0:
          return m
        self._cv.wait(left)

  def output(self, timeout: float) -> str:
    """Everything the child printed, once its output has ended (it exited or closed stdout)."""
    deadline = time.monotonic() + timeout
    with self._cv:
      while not self.closed:
        left = deadline - time.monotonic()
        assert left > 0, f"output still open after {timeout}s:\n{''.join(self.lines)}"
        self._cv.wait(left)
      return "".join(self.lines)

  def wait(self, timeout: float) -> int:
    """The exit status; AssertionError (with the output) if it is still running after `timeout`."""
    try:
      return self.p.wait(timeout)
    except subprocess.TimeoutExpired:
      raise AssertionError(f"process still running after {timeout}s:\n{self.text}") from None

  def kill(self) -> None:
    if self.p.poll() is None:
      self.p.kill()
      self.p.wait(10)

  def wait_serving(self, timeout: float) -> str:
    """For `xlaserve serve`: waits until its models are loaded ("try it:"), then returns its gRPC
    address and sets `address`, `metrics_url` (None with --metrics-port -1) and `http_url`
    (None with --http-port -1)."""
    assert self.wait_for(r"try it:", timeout), f"server did not become ready:\n{self.text}"
    m = re.search(r"listening for gRPC on 127\.0\.0\.1:(\d+)(?:, Prometheus metrics at"
                  r" (http://\S+))?", self.text)
    assert m, self.text
    self.address, self.metrics_url = f"127.0.0.1:{m.group(1)}", m.group(2)
    h = re.search(r"listening for HTTP/REST \(KServe v2\) on (https?://\S+)", self.text)
    self.http_url = h.group(1) if h else None
    return self.address


def serve(args: list[str], *, timeout: float = 240, env: dict[str, str] | None = None,
          cwd: pathlib.Path | str = REPO_ROOT) -> Proc:
  """`xlaserve serve ARGS` started and waited for (`wait_serving`); killed if it never serves."""
  proc = Proc([*SERVE, *args], env=env, cwd=cwd)
  try:
    proc.wait_serving(timeout)
  except BaseException:
    proc.kill()
    raise
  return proc
