"""Two processes serve one DLRM over gRPC: its tables row-sharded over a mesh spanning both.

`xlaserve serve --coordinator ...` twice on 127.0.0.1, 2 CPU devices each (a 4-device global
mesh): process 0 serves gRPC, process 1 runs each batch in lockstep. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
import tritonclient.grpc as tc
from flax import nnx

import export
from models.dlrm import DLRM, DLRMConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BUCKETS = (1, 4, 8)
START_TIMEOUT_S = 120  # export + two processes loading and compiling 3 buckets on 2 shared cores
EXIT_TIMEOUT_S = 30


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)  # each process sets its own 2 devices (--local-devices)
  path = [str(REPO_ROOT), env.get("PYTHONPATH", "")]
  env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
  return env


class _Proc:
  """A subprocess whose output lines are collected on a thread (so waits can be bounded)."""

  def __init__(self, args: list[str]):
    self.p = subprocess.Popen(args, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self.closed = False  # stdout reached its end
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
    """The first match of `pattern` in the output, waiting at most `timeout` s (None: no match)."""
    deadline = time.monotonic() + timeout
    with self._cv:
      while True:
        m = re.search(pattern, "".join(self.lines))
        left = deadline - time.monotonic()
        if m or self.closed or left <= 0:
          return m
        self._cv.wait(left)

  def kill(self) -> None:
    if self.p.poll() is None:
      self.p.kill()
      self.p.wait(10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  # Every table's rows divide the 4 global devices, so each device holds a quarter of each.
  cfg = dataclasses.replace(DLRMConfig.tiny(), table_sizes=(1024, 512, 96, 64) + (16,) * 22)
  model = DLRM(cfg, rngs=nnx.Rngs(7))
  repo = tmp_path_factory.mktemp("repo")
  export.export_model(model, repository=repo, name="dlrm",
                      inputs=[export.Input("dense", "float32", ("batch", 13)),
                              export.Input("sparse", "int64", ("batch", 26))],
                      config=export.ExportConfig(batch_buckets=BUCKETS))
  return repo, model, cfg


def _infer(client, dense, sparse):
  ins = [tc.InferInput("dense", list(dense.shape), "FP32"),
         tc.InferInput("sparse", list(sparse.shape), "INT64")]
  ins[0].set_data_from_numpy(dense)
  ins[1].set_data_from_numpy(sparse)
  return client.infer("dlrm", ins, client_timeout=30).as_numpy("prob")


def _device_bytes(text: str) -> tuple[int, dict[int, int], int]:
  m = re.search(r"process (\d+): params bytes per local device: ([\d= ]+) \(whole model (\d+)"
                r" bytes\)", text)
  assert m, text
  held = dict(tuple(int(v) for v in kv.split("=")) for kv in m.group(2).split())
  return int(m.group(1)), held, int(m.group(3))


def test_two_processes_serve_row_sharded_dlrm(bundle):
  repo, model, cfg = bundle
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [_Proc([sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repo),
                  "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i),
                  "--local-devices", "2", "--sharding", "embedding_rows", "--grpc-port", "0",
                  "--metrics-port", "-1", "--compile-cache", "none"]) for i in range(2)]
  leader, follower = procs
  try:
    ready = leader.wait_for(r"try it:", START_TIMEOUT_S)
    assert ready, f"leader not ready:\n{leader.text}\n--- follower:\n{follower.text}"
    port = re.search(r"listening for gRPC on 127\.0\.0\.1:(\d+)", leader.text).group(1)
    assert follower.wait_for(r"running the leader's batches", 10), follower.text
    assert "serves gRPC" in leader.text and "follower (runs the leader's batches)" in follower.text

    rng = np.random.default_rng(0)
    with tc.InferenceServerClient(f"127.0.0.1:{port}") as c:
      assert c.is_server_ready() and c.is_model_ready("dlrm")
      for rows in (1, 3, 4, 8, 13):  # buckets 1, 4, 4, 8; 13 rows split over two batches
        dense = rng.normal(size=(rows, 13)).astype(np.float32)
        sparse = rng.integers(-1, 3000, size=(rows, 26))  # missing (-1) and hashed (> rows) ids
        got = _infer(c, dense, sparse)
        want = np.asarray(model(jnp.asarray(dense), jnp.asarray(sparse))["prob"])
        assert got.shape == (rows, 1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
      # int64 ids beyond int32 are refused before anything is broadcast; the group stays in step.
      too_big = np.full((2, 26), 2**40, np.int64)
      with pytest.raises(tc.InferenceServerException, match="outside int32") as refused:
        _infer(c, np.zeros((2, 13), np.float32), too_big)
      assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
      dense = rng.normal(size=(2, 13)).astype(np.float32)
      sparse = rng.integers(0, 3000, size=(2, 26))
      np.testing.assert_allclose(
          _infer(c, dense, sparse),
          np.asarray(model(jnp.asarray(dense), jnp.asarray(sparse))["prob"]), rtol=1e-5, atol=1e-6)
      batches = c.get_inference_statistics("dlrm").model_stats[0].execution_count
    assert batches == 7  # 1 + 1 + 1 + 1 + 2 + 1

    # Each process holds only its quarter of every table (the dense layers are replicated).
    table_bytes = sum(cfg.table_sizes) * cfg.embed_dim * 4
    seen: dict[int, int] = {}
    for i, p in enumerate(procs):
      pid, held, whole = _device_bytes(p.text)
      assert pid == i and len(held) == 2
      dense_bytes = whole - table_bytes
      assert all(n == table_bytes // 4 + dense_bytes for n in held.values()), held
      seen.update(held)
    assert len(seen) == 4  # four distinct devices: one global mesh over both processes

    leader.p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.p.wait(EXIT_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        pytest.fail(f"process did not exit {EXIT_TIMEOUT_S}s after SIGTERM:\n{p.text}")
    assert leader.p.returncode == 0, leader.text
    assert follower.p.returncode == 0, follower.text
    # The follower ran exactly the leader's batches: 3 warm-up buckets plus the served ones.
    m = follower.wait_for(r"the leader stopped after (\d+) batches", 5)
    assert m and int(m.group(1)) == len(BUCKETS) + batches, follower.text
  finally:
    for p in procs:
      p.kill()
