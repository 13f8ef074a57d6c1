"""`xlaserve serve` as a real process: demo start-up, tritonclient, metrics, graceful SIGTERM."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def test_help_explains_every_flag():
  out = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for flag in ("--model-repository", "--grpc-port", "--metrics-port", "--compile-cache",
               "--max-queue-delay-us", "--devices", "--sharding", "--demo-tiny", "--frontend",
               "--instances", "--model-load-thread-count"):
    assert flag in out


def test_missing_repository_says_what_to_do(tmp_path):
  p = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--model-repository",
                      str(tmp_path / "nope")], capture_output=True, text=True)
  assert p.returncode == 2 and "export.export_model" in p.stderr


@pytest.fixture
def demo_process(tmp_path):
  proc, addr, metrics_url, lines = _start(
      ["--demo-tiny", "--grpc-port", "0", "--metrics-port", "0",
       "--compile-cache", str(tmp_path / "cache")], XLASERVE_HOME=str(tmp_path / "home"))
  yield proc, addr, metrics_url, lines
  if proc.poll() is None:
    proc.kill()
    proc.wait(10)


def _infer(addr, n, seed):
  rng = np.random.default_rng(seed)
  with tc.InferenceServerClient(addr) as c:
    d = tc.InferInput("dense", [n, 13], "FP32")
    d.set_data_from_numpy(rng.random((n, 13), dtype=np.float32))
    s = tc.InferInput("sparse", [n, 26], "INT64")
    s.set_data_from_numpy(rng.integers(0, 10**6, (n, 26)))
    return c.infer("dlrm", [d, s]).as_numpy("prob")


def test_demo_serves_and_stops_on_sigterm(demo_process):
  proc, addr, metrics_url, lines = demo_process
  c = tc.InferenceServerClient(addr)
  assert c.is_server_ready() and c.is_model_ready("dlrm")
  for name in ("relevance", "dcn_v2", "two_tower_query", "two_tower_ad"):  # one per signature
    assert c.is_model_ready(name), name
  out = _infer(addr, 3, 0)
  assert out.shape == (3, 1) and np.all((out > 0) & (out < 1))
  from serving.frontend.native import load_extension
  front = "native" if load_extension()[0] is not None else "python"  # no flag: native if built
  assert any(f"gRPC front end: {front}" in line for line in lines), "".join(lines)
  body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
  for name in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
               "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
               "nv_inference_request_duration_us", "nv_inference_pending_request_count",
               "xlaserve_batch_rows", "xlaserve_batch_padding_fraction"):
    assert name in body, name
  assert "xlaserve_compiles_after_warmup 0.0" in body
  # Triton's exact series names (no `_total` suffix), counting the one request above.
  assert 'nv_inference_request_success{model="dlrm",version="1"} 1.0' in body
  assert 'nv_inference_count{model="dlrm",version="1"} 3.0' in body
  # SIGTERM on an idle server: a clean exit (draining under load: the test below).
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0, "".join(lines)
  assert any("stopped" in l for l in lines)


def _start(args, **env):
  """`xlaserve serve ARGS` in a subprocess, once ready: (proc, gRPC address, metrics URL, lines)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "serving.cli", "serve", *args], stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
  lines: list[str] = []
  ready = threading.Event()

  def pump():
    for line in proc.stdout:
      lines.append(line)
      if "try it:" in line:
        ready.set()
    ready.set()

  threading.Thread(target=pump, daemon=True).start()
  assert ready.wait(240), "server did not become ready:\n" + "".join(lines)
  m = re.search(r"gRPC on 127\.0\.0\.1:(\d+), Prometheus metrics at (http://\S+)", "".join(lines))
  assert m, "".join(lines)
  return proc, f"127.0.0.1:{m.group(1)}", m.group(2), lines


def _serve_process(repo, tmp_path, *extra):
  return _start(["--model-repository", str(repo), "--grpc-port", "0", "--metrics-port", "0",
                 "--compile-cache", str(tmp_path / "cache"), *extra])


def test_sigterm_answers_in_flight_work_refuses_new_requests_and_exits_0(tmp_path):
  """Requests provably in flight when SIGTERM lands are answered; requests arriving during the
  drain get UNAVAILABLE while readiness reads false; the process exits 0."""
  import jax.numpy as jnp

  import export

  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(256, 4096)).astype(np.float32) / 16
  w2 = rng.normal(size=(4096, 8)).astype(np.float32) / 64
  export.export_model(lambda p, inputs: {"y": jnp.tanh(inputs["x"] @ p["w1"]) @ p["w2"]},
                      params={"w1": w1, "w2": w2}, repository=tmp_path / "repo", name="mlp",
                      inputs=[export.Input("x", "float32", ("batch", 256))],
                      config=export.ExportConfig(batch_buckets=(1, 64, 512)))
  proc, addr, metrics_url, lines = _serve_process(tmp_path / "repo", tmp_path,
                                                  "--log-format", "json")
  try:
    big = rng.normal(size=(32768, 256)).astype(np.float32)  # 32 MiB: about a second of work

    def infer(x):
      with tc.InferenceServerClient(addr) as c:
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = c.infer("mlp", [inp], client_timeout=120).as_numpy("y")
        return out, time.perf_counter()

    head, _ = infer(big[:64])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      futs = [pool.submit(infer, big) for _ in range(2)]
      pending = 'nv_inference_pending_request_count{model="mlp",version="1"}'
      end = time.perf_counter() + 60
      while True:  # wait until the server has accepted both big requests into its queue
        body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        m = re.search(re.escape(pending) + r" (\S+)", body)
        if m and float(m.group(1)) >= 2:
          break
        assert time.perf_counter() < end and not any(f.done() for f in futs)
        time.sleep(0.005)
      t_sigterm = time.perf_counter()
      proc.send_signal(signal.SIGTERM)
      c = tc.InferenceServerClient(addr)
      _wait_false = time.perf_counter() + 5
      while c.is_server_ready():  # readiness turns false at once (the handler is async)
        assert time.perf_counter() < _wait_false
        time.sleep(0.002)
      with pytest.raises(InferenceServerException) as e:
        infer(big[:4])
      # Answered by the servicer itself ("shutting down"), so during the drain, not after it.
      assert "UNAVAILABLE" in str(e.value.status()) and "shutting down" in e.value.message()
      for f in futs:
        out, t_done = f.result()
        assert t_done > t_sigterm and out.shape == (32768, 8)
        np.testing.assert_allclose(out[:64], head, rtol=1e-4, atol=1e-5)
    assert proc.wait(60) == 0, "".join(lines)
    # --log-format json: progress and Python logs are JSON lines (XLA's own C++ logging is not
    # ours to format, so lines not starting with "{" are left alone).
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not any(line.startswith("[xlaserve") for line in lines)
    assert len(records) >= 5 and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    msgs = [r["msg"] for r in records]
    assert any("shutting down" in m for m in msgs) and msgs[-1] == "stopped"
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)
