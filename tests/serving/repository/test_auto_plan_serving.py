"""`bucket_plan: auto` against the real server and a real exported bundle: under steady traffic
whose best buckets differ from the bundle's, the server adopts the better plan through a hot
reload (the new buckets compiled beside the serving ones), fails no request, compiles nothing on
the request path, pads less afterwards, and does not adopt again. Also config.json's
`batch_buckets` override at load, and its refusal."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.request

import grpc
import jax
import numpy as np
import pytest

import export
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import metric, outputs, serving, wait_until
from servingutil import repository_index as index

BUCKETS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  """A small MLP exported with buckets 1 2 4 8 (symbolic batch: any size compiles); its params."""
  staging = tmp_path_factory.mktemp("mlp")
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(16, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  export.export_model(lambda p, inputs: {"y": jax.numpy.tanh(inputs["x"] @ p["w"]) + p["b"]},
                      params=params, repository=staging, name="mlp", version=1,
                      inputs=[export.Input("x", "float32", ("batch", 16))],
                      config=export.ExportConfig(batch_buckets=BUCKETS))
  return staging / "mlp" / "1", params


def _repo(tmp_path, bundle, config: dict):
  import shutil

  repo = tmp_path / "repo"
  shutil.copytree(bundle[0], repo / "mlp" / "1")
  (repo / "mlp" / "config.json").write_text(json.dumps(config))
  return repo


def _request(x: np.ndarray) -> pb.ModelInferRequest:
  req = pb.ModelInferRequest(model_name="mlp")
  req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
  req.raw_input_contents.append(x.tobytes())
  return req


def _reference(params, x):
  return np.tanh(x @ params["w"]) + params["b"]


def _buckets(stub) -> list[int]:
  cfg = stub.ModelConfig(pb.ModelConfigRequest(name="mlp")).config
  return list(cfg.dynamic_batching.preferred_batch_size)


def _scrape(bg) -> str:
  with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics") as r:
    return r.read().decode()


def _padding(text: str, buckets) -> tuple[float, float]:
  """(sum of padded/bucket fractions, batches) of the executed batches in `buckets`."""
  total = sum(metric(text, "xlaserve_batch_padding_fraction_sum", model="mlp", bucket=b)
              for b in buckets)
  count = sum(metric(text, "xlaserve_batch_padding_fraction_count", model="mlp", bucket=b)
              for b in buckets)
  return total, count


class Client:
  """One closed-loop client: requests of 3 and 5 rows in turn, each answer checked against the
  numpy reference; records (rows, error or None)."""

  def __init__(self, address: str, params):
    self.address, self.params = address, params
    self.results: list[tuple[int, str | None]] = []
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    rng = np.random.default_rng(1)
    with grpc.insecure_channel(self.address) as ch:
      stub = pb_grpc.GRPCInferenceServiceStub(ch)
      while not self.stop.is_set():
        rows = (3, 5)[len(self.results) % 2]
        x = rng.normal(size=(rows, 16)).astype(np.float32)
        try:
          y = outputs(stub.ModelInfer(_request(x), timeout=30))["y"]
          np.testing.assert_allclose(y, _reference(self.params, x), rtol=1e-5, atol=1e-5)
          self.results.append((rows, None))
        except grpc.RpcError as e:
          self.results.append((rows, f"{e.code().name}: {e.details()}"))
        except AssertionError as e:
          self.results.append((rows, f"WRONG: {e}"))

  def __enter__(self) -> Client:
    self.thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.stop.set()
    self.thread.join(30)


def test_auto_plan_is_adopted_under_load_without_a_failed_request_or_a_request_compile(
    tmp_path, bundle):
  plan = {"mode": "auto", "interval_s": 1.0, "min_requests": 20, "min_gain": 0.1, "cost": "rows"}
  repo = _repo(tmp_path, bundle, {"bucket_plan": plan})
  with serving(repo, metrics_port=0) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert _buckets(stub) == list(BUCKETS)
    with Client(bg.address, bundle[1]) as client:
      assert wait_until(lambda: _buckets(stub) == [3, 5, 8], timeout=30), _buckets(stub)
      before = _scrape(bg)  # padding of the bundle's buckets, frozen since the switch
      n = len(client.results)
      # Keep the load on past the next planning round: the adopted plan is not adopted again.
      assert wait_until(lambda: len(client.results) > n + 50, timeout=10)
      time.sleep(1.5)
    text = _scrape(bg)
    assert index(stub)[("mlp", "1")] == ("READY", "")
  failures = [r for r in client.results if r[1] is not None]
  assert failures == [] and len(client.results) > 100
  assert metric(text, "xlaserve_compiles_after_warmup") == 0  # every compile was a warm-up's
  assert metric(text, "xlaserve_bucket_plan_adoptions_total", model="mlp") == 1
  assert metric(text, "xlaserve_bucket_plan_waste", model="mlp", version="1") == 0
  # Before: 3 rows padded to 4 (1/4 padding), 5 to 8 (3/8); after: exact buckets, no padding.
  old_sum, old_n = _padding(before, (4, 8))
  new_sum, new_n = _padding(text, (3, 5))
  assert old_n > 0 and old_sum / old_n == pytest.approx((1 / 4 + 3 / 8) / 2, rel=0.2)
  assert new_n > 50 and new_sum == 0


def test_config_batch_buckets_override_the_bundle_and_bad_ones_are_refused(tmp_path, bundle):
  repo = _repo(tmp_path, bundle, {"batch_buckets": [3, 5, 8]})
  params = bundle[1]
  with serving(repo, repository_poll_s=0.05) as bg, grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    assert _buckets(stub) == [3, 5, 8]
    x = np.random.default_rng(2).normal(size=(7, 16)).astype(np.float32)
    np.testing.assert_allclose(outputs(stub.ModelInfer(_request(x)))["y"],
                               _reference(params, x), rtol=1e-5, atol=1e-5)
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp")).model_stats[0]
    assert [b.batch_size for b in stats.batch_stats] == [8]
    # A bad override in a changed config.json: the reload is refused, the version keeps serving.
    (repo / "mlp" / "config.json").write_text(json.dumps({"batch_buckets": [8, 4]}))
    assert wait_until(lambda: bg.server.poller.polls > 3)
    assert _buckets(stub) == [3, 5, 8]
    # A good one is compiled beside the serving runner and switched in.
    (repo / "mlp" / "config.json").write_text(json.dumps({"batch_buckets": [2, 8]}))
    assert wait_until(lambda: _buckets(stub) == [2, 8])
    np.testing.assert_allclose(outputs(stub.ModelInfer(_request(x)))["y"],
                               _reference(params, x), rtol=1e-5, atol=1e-5)
    assert index(stub)[("mlp", "1")] == ("READY", "")
  bad = tmp_path / "bad"
  _repo(bad, bundle, {"batch_buckets": [0, 4]})
  with serving(bad / "repo") as bg, grpc.insecure_channel(bg.address) as ch:
    state, reason = index(pb_grpc.GRPCInferenceServiceStub(ch))[("mlp", "")]
    assert state == "UNAVAILABLE" and "batch_buckets [0, 4] must be >= 1" in reason


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_rebuilding_a_version_under_load_fails_no_request(tmp_path, frontend):
  """The switch itself, many times over: four clients, the mock model rebuilt with other
  buckets eight times (what an adoption does); every request answered, exactly."""
  from serving.frontend import native as native_frontend
  from serving.repository.rebuild import retire
  from servingutil import expected, mock_factory, mock_request, mock_rows, write_mock_bundle

  if frontend == "native" and native_frontend.load_extension()[0] is None:
    pytest.skip("native front end not built")
  repo = tmp_path / "repo"
  write_mock_bundle(repo, "mock", 1)
  results: list[str | None] = []
  stop = threading.Event()

  def client(seed: int) -> None:
    rng = np.random.default_rng(seed)
    with grpc.insecure_channel(bg.address) as ch:
      stub = pb_grpc.GRPCInferenceServiceStub(ch)
      while not stop.is_set():
        x, k = mock_rows(rng, int(rng.integers(1, 12)))
        try:
          out = outputs(stub.ModelInfer(mock_request(x, k), timeout=30))
          ok = np.array_equal(out["y"], expected(x, k)[0])
          results.append(None if ok else "WRONG")
        except grpc.RpcError as e:
          results.append(f"{e.code().name}: {e.details()}")

  with serving(repo, mock_factory(delay_s=0.002), frontend=frontend) as bg:
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
      t.start()
    models = bg.server.repository
    for i in range(8):
      assert wait_until(lambda n=len(results): len(results) > n + 20, timeout=10)
      cfg = models.get("mock", 1).config
      old = models.rebuild("mock", 1, dataclasses.replace(
          cfg, batch_buckets=(3, 5, 8) if i % 2 == 0 else (1, 2, 4, 8)), lambda msg: None)
      if bg.server.native is not None:
        bg.server.native.refresh()
      retire(old, "mock/1")
    stop.set()
    for t in threads:
      t.join(30)
    assert models.get("mock", 1).runner.config.buckets == (1, 2, 4, 8)
  assert [r for r in results if r is not None] == [] and len(results) > 160
