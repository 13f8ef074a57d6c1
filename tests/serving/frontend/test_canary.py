"""Canary splits and shadow scoring through the real server (native front end when built, gRPC
and HTTP): versions of the mock that compute different scores, so every answer shows which
version computed it, checked against the hand-worked references."""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import time
import urllib.request

import grpc
import numpy as np
import pytest
import scipy.stats
import tritonclient.http as th

from serving import shadow_cli
from serving.engines.mock import MockEngine
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.repository.traffic import pick, sticky_point
from servingutil import (expected, http_inputs, metric, mock_request, mock_rows, outputs,
                         repository_index, serving, wait_until, write_mock_bundle)

TILT = np.array([1.0, -1.0, 0.5, 2.0])


class TiltedMock(MockEngine):
  """Another version of the mock: y = 2 * (x . TILT) + 1 (exact in float32 for quarter inputs)."""

  def fetch(self, handle):
    out = super().fetch(handle)
    out["y"] = (2.0 * (handle[0] @ TILT.astype(np.float32))[:, None] + 1.0).astype(np.float32)
    return out


class FailingMock(MockEngine):
  def fetch(self, handle):
    raise RuntimeError("injected shadow failure")


def reference(version: int, x: np.ndarray, k: np.ndarray) -> np.ndarray:
  """y of each mock version, worked by hand in float64."""
  x = x.astype(np.float64)
  return expected(x, k)[0] if version == 1 else 2.0 * (x @ TILT)[:, None] + 1.0


def factory(kinds: dict):
  """Engines by (model, version): `kinds` maps them to (class, kwargs); default the plain mock."""
  def make(path, manifest, cfg):
    cls, kw = kinds.get((manifest.name, manifest.version), (MockEngine, {}))
    return cls(buckets=manifest.batch_buckets, **kw)
  return make


def write_model(repo: pathlib.Path, name: str, versions: tuple[int, ...], config: dict) -> None:
  """Mock bundles of `versions` under `repo/name`, all served, with `config`. No queue-wait
  bound: these tests send hundreds of requests from the test process, whose cyclic-GC pauses
  (about 1 s late in the suite, see servingutil.FUZZ_SERVER) would shed one unstarted."""
  for v in versions:
    write_mock_bundle(repo, name, v)
  (repo / name / "config.json").write_text(json.dumps(
      {"version_policy": "all", "max_queue_wait_ms": 0, **config}))


@contextlib.contextmanager
def server(tmp_path: pathlib.Path, models: dict, kinds: dict, **config):
  repo = tmp_path / "repo"
  for name, (versions, cfg) in models.items():
    write_model(repo, name, versions, cfg)
  with serving(repo, factory(kinds), metrics_port=0, **config) as bg:
    channel = grpc.insecure_channel(bg.address)
    try:
      yield bg, pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
      channel.close()


def scrape(bg) -> str:
  with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics") as r:
    return r.read().decode()


def shadow_report(bg, model: str) -> dict:
  return shadow_cli.fetch(f"http://127.0.0.1:{bg.server.http_port}", model, None, 30)


def answer(stub, x, k, **kw) -> tuple[int, np.ndarray]:
  """(version that answered, y)."""
  resp = stub.ModelInfer(mock_request(x, k, **kw))
  return int(resp.model_version), outputs(resp)["y"]


def test_split_by_weight_sticky_per_key_explicit_version_bypasses(tmp_path):
  cfg = {"traffic": {"versions": {"1": 80, "2": 20}, "sticky_parameter": "user_id"}}
  with server(tmp_path, {"mock": ((1, 2), cfg)}, {("mock", 2): (TiltedMock, {})},
              http_port=0) as (bg, stub):
    rng = np.random.default_rng(0)
    x, k = mock_rows(rng, 1)
    keys = rng.integers(1, 1 << 62, size=2000)
    got = []
    for key in keys:
      version, y = answer(stub, x, k, user_id=int(key))
      np.testing.assert_array_equal(y, reference(version, x, k))  # that version computed it
      got.append(version)
    n, share = len(got), 0.2
    assert abs(got.count(2) - n * share) <= 4 * np.sqrt(n * share * (1 - share)), got.count(2)
    # Sticky: a key stays on its version, on gRPC and HTTP (binary tensors) alike, and it is
    # the version the key's sticky point falls on.
    http = th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}")
    for key in keys[:40]:
      want = pick(((1, 80), (2, 20)), {1, 2}, sticky_point(str(key)))
      assert {answer(stub, x, k, user_id=int(key))[0] for _ in range(5)} == {want}
      res = http.infer("mock", http_inputs({"x": x, "k": k}), parameters={"user_id": str(key)})
      assert int(res.get_response()["model_version"]) == want
      # An explicit version bypasses the split.
      other = 3 - want
      assert answer(stub, x, k, version=str(other), user_id=int(key))[0] == other
    # Without a key: random by weight (both versions seen over 200 calls at 20%).
    assert {answer(stub, x, k)[0] for _ in range(200)} == {1, 2}
    text = scrape(bg)
    split_1 = metric(text, "xlaserve_traffic_requests_total", model="mock", version="1")
    split_2 = metric(text, "xlaserve_traffic_requests_total", model="mock", version="2")
    assert split_2 >= got.count(2) + 4 and split_1 + split_2 == 2000 + 40 * 6 + 200
    for v in ("1", "2"):  # the per-version series count what each version served
      assert metric(text, "nv_inference_request_success", model="mock", version=v) >= (
          split_1 if v == "1" else split_2)
    http.close()
    # Weights move on a reload (the native front end republished after it); no split: default.
    config = tmp_path / "repo" / "mock" / "config.json"
    for weights, want in (({"1": 100, "2": 0}, {1}), (None, {2})):
      config.write_text(json.dumps({"version_policy": "all", **(
          {"traffic": {"versions": weights}} if weights else {})}))
      stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mock"))
      assert {answer(stub, x, k, user_id=int(key))[0] for key in keys[:30]} == want


def send_rows(stub, rng, n_requests: int, model: str = "mock") -> tuple[list, list]:
  """Unversioned requests of 1..8 rows; each answer is version 1's exactly."""
  primary, shadow = [], []
  for _ in range(n_requests):
    x, k = mock_rows(rng, int(rng.integers(1, 9)))
    version, y = answer(stub, x, k, model=model)
    assert version == 1
    np.testing.assert_array_equal(y, reference(1, x, k))
    primary.append(reference(1, x, k).ravel())
    shadow.append(reference(2, x, k).ravel())
  return primary, shadow


def test_shadow_never_answers_and_its_comparison_equals_numpy(tmp_path):
  cfg = {"shadow": {"version": 2, "fraction": 1.0, "queue_requests": 1000, "output": "y"}}
  with server(tmp_path, {"mock": ((1, 2), cfg)}, {("mock", 2): (TiltedMock, {})},
              http_port=0) as (bg, stub):
    rng = np.random.default_rng(1)
    primary, shadow = send_rows(stub, rng, 150)  # v2 is newer, but a shadow never serves
    assert wait_until(lambda: shadow_report(bg, "mock")["comparisons"]
                      and shadow_report(bg, "mock")["comparisons"][0]["requests"] == 150)
    x, k = mock_rows(rng, 3)
    assert answer(stub, x, k, version="1")[0] == 1  # named versions are not shadowed
    assert answer(stub, x, k, version="2")[0] == 2  # ... and the shadow answers when named
    report = shadow_report(bg, "mock")
    (c,) = report["comparisons"]
    assert (c["primary_version"], c["shadow_version"], c["requests"]) == (1, 2, 150)
    assert report["shadow_counts"][0]["submitted"] == 150
    p, s = np.concatenate(primary), np.concatenate(shadow)
    ranked = [(a, b) for a, b in zip(primary, shadow) if len(a) > 1]
    assert c["rows"] == len(p) and c["exact_quantiles"]
    assert c["mean_primary"] == pytest.approx(p.mean(), rel=1e-12)
    assert c["mean_shadow"] == pytest.approx(s.mean(), rel=1e-12)
    assert c["mean_shift"] == pytest.approx(s.mean() - p.mean(), rel=1e-9, abs=1e-12)
    assert c["calibration_ratio"] == pytest.approx(s.mean() / p.mean(), rel=1e-12)
    assert c["spearman"] == pytest.approx(scipy.stats.spearmanr(p, s)[0], rel=1e-12)
    assert c["top_changed_share"] == pytest.approx(
        np.mean([np.argmax(a) != np.argmax(b) for a, b in ranked]), rel=1e-12)
    for q in (50, 90, 99):
      want_p, want_s = np.quantile(p, q / 100), np.quantile(s, q / 100)
      assert c["quantiles"][f"p{q}"]["primary"] == pytest.approx(want_p, rel=1e-12)
      assert c["quantiles"][f"p{q}"]["shadow"] == pytest.approx(want_s, rel=1e-12)
    text = scrape(bg)
    labels = {"model": "mock", "version": "1", "shadow_version": "2"}
    assert metric(text, "xlaserve_shadow_mean_shift", **labels) == pytest.approx(
        c["mean_shift"], rel=1e-9, abs=1e-12)
    assert metric(text, "xlaserve_shadow_rank_correlation", **labels) == pytest.approx(
        c["spearman"])
    assert metric(text, "xlaserve_shadow_quantile", side="shadow", quantile="0.9",
                  **labels) == pytest.approx(c["quantiles"]["p90"]["shadow"])
    assert metric(text, "xlaserve_shadow_submitted_total", model="mock",
                  shadow_version="2") == 150
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      assert shadow_cli.main(shadow_cli_args(bg, "mock")) == 0
    assert "served v1 vs shadow v2: 150 requests" in out.getvalue()
    assert f"Spearman rank correlation: {c['spearman']:.4f}" in out.getvalue()


def shadow_cli_args(bg, model: str):
  import argparse
  return argparse.Namespace(url=f"http://127.0.0.1:{bg.server.http_port}", model=model,
                            token=None, json=False, timeout_s=30.0)


def test_slow_or_failing_shadow_changes_no_response_nor_its_latency(tmp_path):
  slow = {"traffic": {"versions": {"1": 1}},
          "shadow": {"version": 2, "fraction": 1.0, "queue_requests": 2}}
  models = {"plain": ((1,), {"traffic": {"versions": {"1": 1}}}),  # same path, no shadow
            "slow": ((1, 2), slow), "failing": ((1, 2), slow),
            "broken": ((1,), {"shadow": {"version": 7}})}
  kinds = {("slow", 2): (MockEngine, {"delay_s": 0.5}), ("failing", 2): (FailingMock, {})}
  with server(tmp_path, models, kinds, http_port=0) as (bg, stub):
    rng = np.random.default_rng(2)
    lat = {"plain": [], "slow": []}
    for _ in range(60):
      for model in ("plain", "slow"):
        x, k = mock_rows(rng, 4)
        t0 = time.perf_counter()
        version, y = answer(stub, x, k, model=model)
        lat[model].append(time.perf_counter() - t0)
        assert version == 1
        np.testing.assert_array_equal(y, reference(1, x, k))
    p50_off, p50_on = np.median(lat["plain"]), np.median(lat["slow"])
    assert p50_on < 3 * p50_off + 0.05, (p50_off, p50_on)  # a waited-for shadow takes 0.5 s
    primary, _ = send_rows(stub, rng, 20, model="failing")
    counts = shadow_report(bg, "slow")["shadow_counts"][0]
    assert counts["dropped"] >= 50 and counts["submitted"] + counts["dropped"] == 60
    assert wait_until(lambda: shadow_report(bg, "failing")["shadow_counts"][0]["inflight"] == 0)
    failing = shadow_report(bg, "failing")["shadow_counts"][0]
    assert failing["failed"] == failing["submitted"] and failing["failed"] >= 1
    assert failing["failed"] + failing["dropped"] == 20
    assert "injected shadow failure" in failing["last_error"]
    text = scrape(bg)
    assert metric(text, "xlaserve_shadow_dropped_total", model="slow",
                  shadow_version="2") == counts["dropped"]
    # A shadow version the repository does not hold is refused at load, with the reason.
    state, reason = repository_index(stub)[("broken", "")]
    assert state == "UNAVAILABLE" and "name versions [7]" in reason
    assert answer(stub, x, k, model="plain")[0] == 1  # the others keep serving
    with pytest.raises(RuntimeError, match="HTTP 404: model 'nothing' is not in the repository"):
      shadow_report(bg, "nothing")


def _keyed(x, k, key) -> pb.ModelInferRequest:
  """An unversioned request whose user_id is a string, a bool or an int parameter."""
  req = mock_request(x, k)
  param = req.parameters["user_id"]
  if isinstance(key, bool):
    param.bool_param = key
  elif isinstance(key, int):
    param.int64_param = key
  else:
    param.string_param = key
  return req


def test_the_native_front_end_splits_on_its_fast_path_as_python_would(tmp_path):
  cfg = {"traffic": {"versions": {"1": 50, "2": 50}, "sticky_parameter": "user_id"},
         "shadow": {"version": 3, "fraction": 0.5, "queue_requests": 1000, "output": "y"}}
  with server(tmp_path, {"mock": ((1, 2, 3), cfg)}, {("mock", 2): (TiltedMock, {})},
              http_port=0) as (bg, stub):
    if bg.server.native is None:
      pytest.skip("the native front end is not built")
    rng = np.random.default_rng(5)
    x, k = mock_rows(rng, 2)
    keys = ["alice", "bob", "\u00e9l\u00e8ve", True, False, -7, 2 ** 40, *range(40)]
    before = bg.server.native.stats()
    for key in keys:  # the version is the one the key's point falls on (Python's rule)
      want = pick(((1, 50), (2, 50)), {1, 2}, sticky_point(str(key)))
      for _ in range(3):
        resp = stub.ModelInfer(_keyed(x, k, key))
        assert int(resp.model_version) == want, key
        np.testing.assert_array_equal(outputs(resp)["y"], reference(want, x, k))
    n = 3 * len(keys)
    after = bg.server.native.stats()
    fast, relayed = after["fast"] - before["fast"], after["relayed"] - before["relayed"]
    assert fast + relayed == n
    # Half were drawn for the shadow and relayed (marked) for Python to score; each was scored
    # once: no second draw in Python (that would shadow a quarter).
    assert abs(relayed - n / 2) <= 4 * np.sqrt(n / 4), relayed
    assert wait_until(lambda: sum(c["submitted"] for c in shadow_report(bg, "mock")[
        "shadow_counts"]) == relayed)
    report = shadow_report(bg, "mock")
    assert sum(report["traffic"]["requests"].values()) == n  # native and Python routes
