"""`xlaserve serve` as a real process: demo start-up, tritonclient, metrics, graceful SIGTERM."""

import concurrent.futures
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


def test_help_explains_every_flag():
  out = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--help"],
                       capture_output=True, text=True, check=True).stdout
  for flag in ("--model-repository", "--grpc-port", "--metrics-port", "--compile-cache",
               "--max-queue-delay-us", "--devices", "--sharding", "--demo-tiny"):
    assert flag in out


def test_missing_repository_says_what_to_do(tmp_path):
  p = subprocess.run([sys.executable, "-m", "serving.cli", "serve", "--model-repository",
                      str(tmp_path / "nope")], capture_output=True, text=True)
  assert p.returncode == 2 and "export.export_model" in p.stderr


@pytest.fixture
def demo_process(tmp_path):
  env = dict(os.environ, XLASERVE_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "serving.cli", "serve", "--demo-tiny", "--grpc-port", "0",
       "--metrics-port", "0", "--compile-cache", str(tmp_path / "cache")],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
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
  text = "".join(lines)
  m = re.search(r"gRPC on 127\.0\.0\.1:(\d+), Prometheus metrics at (http://\S+)", text)
  assert m, text
  yield proc, f"127.0.0.1:{m.group(1)}", m.group(2), lines
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


def test_demo_serves_then_drains_on_sigterm(demo_process):
  proc, addr, metrics_url, lines = demo_process
  c = tc.InferenceServerClient(addr)
  assert c.is_server_ready() and c.is_model_ready("dlrm")
  out = _infer(addr, 3, 0)
  assert out.shape == (3, 1) and np.all((out > 0) & (out < 1))
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
  # Graceful shutdown: requests in flight when SIGTERM arrives are all answered.
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    futs = [pool.submit(_infer, addr, 64, i) for i in range(48)]
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    answered, refused = 0, 0
    for f in futs:
      try:
        assert f.result().shape == (64, 1)
        answered += 1
      except Exception as e:  # only requests that arrived after SIGTERM may be refused
        assert "UNAVAILABLE" in str(e), e
        refused += 1
  assert proc.wait(60) == 0, "".join(lines)
  assert answered >= 1 and answered + refused == 48
  assert any("stopped" in l for l in lines)
