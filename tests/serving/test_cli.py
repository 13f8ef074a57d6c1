"""`xlaserve serve` as a real process: demo start-up, tritonclient, metrics, graceful SIGTERM."""

import concurrent.futures
import json
import pathlib
import re
import signal
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from clientutil import infer
from procutil import child_env, run_cli, serve


def test_help_explains_every_flag():
  p = run_cli("--help")
  assert p.returncode == 0, p.stderr
  out = p.stdout
  for flag in ("--model-repository", "--grpc-port", "--metrics-port", "--compile-cache",
               "--max-queue-delay-us", "--devices", "--sharding", "--demo-tiny", "--frontend",
               "--instances", "--model-load-thread-count", "--http-port"):
    assert flag in out


def test_missing_repository_says_what_to_do(tmp_path):
  p = run_cli("--model-repository", str(tmp_path / "nope"))
  assert p.returncode == 2 and "export.export_model" in p.stderr


@pytest.fixture
def demo_process(tmp_path):
  proc = serve(["--demo-tiny", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
                "--compile-cache", str(tmp_path / "cache")],
               env=child_env(XLASERVE_HOME=str(tmp_path / "home")))
  yield proc
  proc.kill()


def _infer(addr, n, seed):
  rng = np.random.default_rng(seed)
  with tc.InferenceServerClient(addr) as c:
    inputs = {"dense": rng.random((n, 13), dtype=np.float32),
              "sparse": rng.integers(0, 10**6, (n, 26))}
    return infer(c, "dlrm", inputs, ("prob",))["prob"]


def test_demo_serves_and_stops_on_sigterm(demo_process):
  proc = demo_process
  addr, metrics_url = proc.address, proc.metrics_url
  c = tc.InferenceServerClient(addr)
  assert c.is_server_ready() and c.is_model_ready("dlrm")
  for name in ("relevance", "dcn_v2", "two_tower_query", "two_tower_ad", "ranker", "ad_index",
               "ads_pipeline"):  # one per signature, and the retrieval -> ranking pipeline
    assert c.is_model_ready(name), name
  ads = infer(c, "ads_pipeline", {"query": np.array([b"acme shoes"], dtype=object),
                                  "history": np.arange(6, dtype=np.int32)[None],
                                  "user_dense": np.ones((1, 3), np.float32)})
  assert ads["ad_ids"].shape == ads["scores"].shape == (1, 10)
  assert np.all(np.diff(ads["scores"][0]) <= 0) and len(set(ads["ad_ids"][0])) == 10
  # A first start serves each demo model as soon as it is built, the first before the next
  # build begins (tests/serving/test_first_start.py: the readiness rules meanwhile), and it
  # never goes quiet: a progress line at least every ~10 s until "try it:".
  text = proc.text
  assert text.index("ctr_light/1: READY") < text.index("building demo model 'dlrm'"), text
  stamps = [int(h) * 3600 + int(m) * 60 + int(sec) for h, m, sec in re.findall(
      r"^\[xlaserve (\d\d):(\d\d):(\d\d)\]", text[:text.index("try it:")], re.M)]
  assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 15, text
  out = _infer(addr, 3, 0)
  assert out.shape == (3, 1) and np.all((out > 0) & (out < 1))
  # The same process answers KServe v2 over HTTP on the port its start-up line names.
  assert proc.http_url and urllib.request.urlopen(
      f"{proc.http_url}/v2/health/ready", timeout=10).status == 200
  dlrm = json.loads(urllib.request.urlopen(f"{proc.http_url}/v2/models/dlrm", timeout=10).read())
  assert [t["name"] for t in dlrm["inputs"]] == ["dense", "sparse"]
  from serving.frontend.native import load_extension
  front = "native" if load_extension()[0] is not None else "python"  # no flag: native if built
  assert f"gRPC front end: {front}" in proc.text, proc.text
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
  proc.p.send_signal(signal.SIGTERM)
  assert proc.wait(60) == 0, proc.text
  assert "stopped" in proc.output(10)


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
  proc = serve(["--model-repository", str(tmp_path / "repo"), "--grpc-port", "0",
                "--metrics-port", "0", "--http-port", "-1", "--max-queue-wait-ms", "0",
                "--compile-cache", str(tmp_path / "cache"), "--log-format", "json"])
  addr, metrics_url = proc.address, proc.metrics_url
  try:
    big = rng.normal(size=(32768, 256)).astype(np.float32)  # 32 MiB: about a second of work

    def run(x):
      with tc.InferenceServerClient(addr) as c:
        out = infer(c, "mlp", {"x": x}, ("y",), client_timeout=120)["y"]
        return out, time.perf_counter()

    head, _ = run(big[:64])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      futs = [pool.submit(run, big) for _ in range(2)]
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
      proc.p.send_signal(signal.SIGTERM)
      c = tc.InferenceServerClient(addr)
      _wait_false = time.perf_counter() + 5
      while c.is_server_ready():  # readiness turns false at once (the handler is async)
        assert time.perf_counter() < _wait_false
        time.sleep(0.002)
      with pytest.raises(InferenceServerException) as e:
        run(big[:4])
      # Answered by the servicer itself ("shutting down"), so during the drain, not after it.
      assert "UNAVAILABLE" in str(e.value.status()) and "shutting down" in e.value.message()
      for f in futs:
        out, t_done = f.result()
        assert t_done > t_sigterm and out.shape == (32768, 8)
        np.testing.assert_allclose(out[:64], head, rtol=1e-4, atol=1e-5)
    assert proc.wait(60) == 0, proc.text
    lines = proc.output(10).splitlines(keepends=True)
    # --log-format json: progress and Python logs are JSON lines (XLA's own C++ logging is not
    # ours to format, so lines not starting with "{" are left alone).
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert not any(line.startswith("[xlaserve") for line in lines)
    assert len(records) >= 5 and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    msgs = [r["msg"] for r in records]
    assert any("shutting down" in m for m in msgs) and msgs[-1] == "stopped"
  finally:
    proc.kill()


def _xla_pool_threads(pid: int) -> int:
  """How many threads of XLA's CPU intra-op pool (named tf_XLAEigen) process `pid` runs."""
  tasks = pathlib.Path(f"/proc/{pid}/task")
  return sum((t / "comm").read_text().strip() == "tf_XLAEigen" for t in tasks.iterdir())


def _export_mlp(tmp_path: pathlib.Path, rng: np.random.Generator) -> np.ndarray:
  """A tanh(x @ w) model in tmp_path/repo (buckets 1, 4, 16); returns w."""
  import jax.numpy as jnp

  import export

  w = rng.normal(size=(16, 3)).astype(np.float32)
  export.export_model(lambda p, inputs: {"y": jnp.tanh(inputs["x"] @ p["w"])},
                      params={"w": w}, repository=tmp_path / "repo", name="mlp",
                      inputs=[export.Input("x", "float32", ("batch", 16))],
                      config=export.ExportConfig(batch_buckets=(1, 4, 16)))
  return w


def _check_mlp_answers(proc, w: np.ndarray, rng: np.random.Generator) -> None:
  """Requests of every size, split across buckets and sent at once: numpy's answers."""
  xs = [rng.normal(size=(n, 16)).astype(np.float32) for n in (1, 3, 4, 7, 16, 40) * 3]

  def run(x):
    with tc.InferenceServerClient(proc.address) as c:
      return infer(c, "mlp", {"x": x}, ("y",))["y"]

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    outs = list(pool.map(run, xs))
  for x, out in zip(xs, outs):
    np.testing.assert_allclose(out, np.tanh(x @ w), rtol=1e-5, atol=1e-6)


SERVE_MLP = ["--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1",
             "--compile-cache", "none"]


def test_cpu_sync_dispatch_by_default_serves_the_same_answers(tmp_path):
  """By default (no embedding cache) CPU batches are computed on the runner thread and XLA's
  CPU pools shrink to one thread each (--xla-cpu-threads' default then; XLA keeps one per
  device, so the server runs with its own single device here, not the suite's 8); answers
  match numpy's."""
  rng = np.random.default_rng(1)
  w = _export_mlp(tmp_path, rng)
  proc = serve(["--model-repository", str(tmp_path / "repo"), *SERVE_MLP],
               env=child_env(own_devices=True))
  try:
    _check_mlp_answers(proc, w, rng)
    assert _xla_pool_threads(proc.p.pid) == 1
  finally:
    proc.kill()
  text = proc.output(10)
  assert "CPU batches run on the runner thread" in text
  assert "XLA's CPU thread pools: 1 thread each, programs scheduled for one thread" in text


def test_an_embedding_cache_keeps_async_dispatch(tmp_path):
  """With an embedding cache configured at start (here --embedding-device-budget), batches stay
  on XLA's worker threads, so a cached model's host half overlaps its device step; the server
  says why and serves the same answers."""
  rng = np.random.default_rng(2)
  w = _export_mlp(tmp_path, rng)
  proc = serve(["--model-repository", str(tmp_path / "repo"), *SERVE_MLP,
                "--embedding-device-budget", "64MiB"], env=child_env(own_devices=True))
  try:
    _check_mlp_answers(proc, w, rng)
  finally:
    proc.kill()
  text = proc.output(10)
  assert "stay on XLA's worker threads: an embedding cache is configured" in text
  assert "--embedding-device-budget" in text
  assert "CPU batches run on the runner thread" not in text


@pytest.mark.parametrize("value", ["-1", "two"])
def test_xla_cpu_threads_refuses_a_bad_count(value):
  """--xla-cpu-threads takes 0 or more threads; anything else is a usage error (exit 2) that
  says what to give, before anything loads."""
  out = run_cli("--xla-cpu-threads", value)
  assert out.returncode == 2
  assert "give 0 (one thread per core) or more threads" in out.stderr
