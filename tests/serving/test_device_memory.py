"""Devices and memory, as the server reports them: a model placed on listed devices (ModelConfig
instance_group, ModelStatistics memory_usage over gRPC and HTTP, /metrics), answers equal to
the model's own; the device-memory budget refusing a load and naming who holds the device;
the XLA preallocation default; NVML series from a fake NVML and absent on this CPU host."""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import re
import shutil
import types
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client as prom
import pytest
import tritonclient.grpc as tc
from flax import nnx
from tritonclient.utils import InferenceServerException

from clientutil import assert_served_like, serving
from procutil import child_env, serve
from serving.preallocation import PREALLOCATE_ENV, configure
from serving.repository.placement import engine_factory_for
from serving.telemetry.gpu_metrics import GpuCollector
from servingutil import export_dlrm, metric

PARAMS_OF = lambda model: sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))  # noqa: E731


@pytest.fixture(scope="module")
def dlrm(tmp_path_factory):
  """(bundle folder of a tiny DLRM v1, the Flax model: the reference)."""
  repo = tmp_path_factory.mktemp("exported")
  model = export_dlrm(repo, seed=3, buckets=(4,))
  return repo / "dlrm", model


def _model(repo: pathlib.Path, src: pathlib.Path, name: str, config: dict | None = None) -> None:
  shutil.copytree(src, repo / name)
  if config is not None:
    (repo / name / "config.json").write_text(json.dumps(config))


def _cases(seed: int) -> list[dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  return [{"dense": rng.normal(size=(rows, 13)).astype(np.float32),
           "sparse": rng.integers(-1, 500, size=(rows, 26))} for rows in (1, 3, 6)]


def _reference(model):
  return lambda dense, sparse: model(jnp.asarray(dense), jnp.asarray(sparse))


def test_a_load_over_the_device_budget_is_refused_naming_who_holds_the_device(tmp_path, dlrm):
  src, model = dlrm
  _model(tmp_path, src, "ranker")
  with serving(tmp_path, engine_factory_for(), device_memory_budget_bytes=200_000) as bg:
    _model(tmp_path, src, "relevance")
    with tc.InferenceServerClient(bg.address) as c:
      held = c.get_inference_statistics("ranker").model_stats[0].memory_usage[0].byte_size
      assert PARAMS_OF(model) < held <= 200_000 < 2 * held
      with pytest.raises(InferenceServerException) as e:
        c.load_model("relevance")
      assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
      msg = str(e.value)
      assert re.search(r"loading relevance v1 needs (at least )?[\d.]+ KiB( \(its params\))? on"
                       r" device 0; budget 195\.3 KiB;"
                       r" held: ranker v1 [\d.]+ KiB; unload one or raise"
                       r" --device-memory-budget", msg), msg
      assert not c.is_model_ready("relevance")
      assert assert_served_like(c, "ranker", _cases(2), _reference(model), rtol=1e-5,
                                atol=1e-6) == 3  # the others keep serving
      c.unload_model("ranker")  # its memory is given back: now the other one fits
      c.load_model("relevance")
      assert assert_served_like(c, "relevance", _cases(3)[:1], _reference(model), rtol=1e-5,
                                atol=1e-6) == 1


def test_params_over_the_budget_are_refused_before_loading_the_rest_after_warm_up(tmp_path, dlrm):
  src, model = dlrm
  _model(tmp_path, src, "ranker")
  params = PARAMS_OF(model)
  with serving(tmp_path, engine_factory_for(), model_load_threads=1,
               device_memory_budget_bytes=params // 2) as bg:  # not even the params fit
    with tc.InferenceServerClient(bg.address) as c:
      with pytest.raises(InferenceServerException) as e:
        c.load_model("ranker")
      assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
      assert re.search(r"loading ranker v1 needs at least [\d.]+ KiB \(its params\) on device 0;"
                       r" budget [\d.]+ KiB; held: nothing", str(e.value)), e.value
  with serving(tmp_path, engine_factory_for(), device_memory_budget_bytes=params + 1) as bg:
    with tc.InferenceServerClient(bg.address) as c:  # the params fit; with code and scratch not
      with pytest.raises(InferenceServerException) as e:
        c.load_model("ranker")
      assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED", e.value
      need = float(re.search(r"needs ([\d.]+) KiB on device 0", str(e.value)).group(1))
      assert need * 1024 > params + 1


def test_an_embedding_cache_reports_its_host_tables_and_only_the_cache_on_device(dlrm):
  """Two tables cached: device params are the model's params less those tables plus their
  caches (rows + 1 scratch slot each), host bytes are the two whole tables."""
  from serving.engines.cached import CachedTablesEngine, EmbeddingCacheConfig

  src, model = dlrm
  tables = {"tables/t00": 0.1, "tables/t01": 0.25}
  engine = CachedTablesEngine(src / "1", config=EmbeddingCacheConfig.from_json(
      {"cache_ratios": tables}))
  with contextlib.closing(engine):
    engine.warmup()
    report = engine.memory()
  state = nnx.state(model, nnx.Param)
  whole = {k: np.asarray(state["tables"][k.split("/")[1]][...]) for k in tables}
  cache = sum((int(w.shape[0] * tables[k]) + 1) * w[0].nbytes for k, w in whole.items())
  host = sum(w.nbytes for w in whole.values())
  assert [(d.device, d.params) for d in report.devices] == [(0, PARAMS_OF(model) - host + cache)]
  assert report.host == host and report.device_scratch > 0


def test_preallocation_is_off_unless_asked_for_and_a_user_setting_wins():
  env: dict[str, str] = {}
  assert "off" in configure(env, preallocate=False) and env == {PREALLOCATE_ENV: "false"}
  env = {}
  assert "on" in configure(env, preallocate=True) and env == {}
  env = {PREALLOCATE_ENV: "true"}
  assert "set by the environment" in configure(env, preallocate=False)
  assert env == {PREALLOCATE_ENV: "true"}


def test_a_child_server_places_on_listed_devices_and_reports_them_everywhere(tmp_path, dlrm):
  """A 4-device child server: the model on devices 2 and 3 (ModelConfig, memory_usage over gRPC
  and HTTP, /metrics), answers equal to the model's own, a missing device index refused by
  name; and the CLI turned XLA preallocation off before JAX started a backend (the CPU backend
  ignores the variable, so the server's own start-up line is what shows it)."""
  src, model = dlrm
  _model(tmp_path, src, "dlrm", {"devices": [2, 3]})
  _model(tmp_path, src, "nowhere", {"devices": [1, 4]})
  params = PARAMS_OF(model)
  env = child_env(own_devices=True)
  env.pop(PREALLOCATE_ENV, None)
  env["XLA_FLAGS"] = (env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=4").strip()
  proc = serve(["--model-repository", str(tmp_path), "--grpc-port", "0", "--http-port", "0",
                "--metrics-port", "0", "--compile-cache", "none"], env=env)
  try:
    assert f"XLA preallocation: off ({PREALLOCATE_ENV}=false" in proc.text
    with tc.InferenceServerClient(proc.address) as c:
      group = c.get_model_config("dlrm").config.instance_group
      assert [(g.kind, list(g.gpus), g.count) for g in group] == [(
          tc.model_config_pb2.ModelInstanceGroup.KIND_CPU, [2, 3], 1)]  # Triton: 1 per device
      usage = c.get_inference_statistics("dlrm").model_stats[0].memory_usage
      assert sorted(u.id for u in usage) == [2, 3] and {u.type for u in usage} == {"CPU"}
      assert all(u.byte_size > params for u in usage)  # params, plus scratch of a batch
      assert assert_served_like(c, "dlrm", _cases(1), _reference(model), rtol=1e-5,
                                atol=1e-6) == 3
      with pytest.raises(InferenceServerException) as e:
        c.load_model("nowhere")
      assert "devices [1, 4] names device(s) [4], but this host has 4 cpu device(s)" in str(
          e.value), e.value
    stats = json.loads(urllib.request.urlopen(f"{proc.http_url}/v2/models/dlrm/stats",
                                              timeout=10).read())
    text = urllib.request.urlopen(proc.metrics_url, timeout=10).read().decode()
  finally:
    proc.kill()
  http_usage = stats["model_stats"][0]["memory_usage"]
  assert sorted((u["type"], u["id"], int(u["byte_size"])) for u in http_usage) == sorted(
      (u.type, u.id, u.byte_size) for u in usage)
  by = lambda kind, device: metric(text, "xlaserve_model_memory_bytes", model="dlrm",  # noqa: E731
                                   version="1", kind=kind, device=device)
  for device in ("2", "3"):
    assert by("params", device) == params  # a whole copy on each listed device
    assert by("scratch", device) > 0
    assert by("params", device) + by("executable", device) + by("scratch", device) == next(
        u.byte_size for u in usage if str(u.id) == device)
  assert not re.search(r'xlaserve_model_memory_bytes\{[^}]*device="[01]"', text)
  assert "nv_gpu_" not in text  # no NVML on this host: absent, not zero


class _FakeNvml:
  """pynvml's surface the collector uses: two GPUs, the second without a power reading."""

  class NVMLError(Exception):
    pass

  def __init__(self, fail_init: bool = False):
    self.fail_init = fail_init

  def nvmlInit(self):
    if self.fail_init:
      raise self.NVMLError("Driver Not Loaded")

  def nvmlDeviceGetCount(self):
    return 2

  def nvmlDeviceGetHandleByIndex(self, i):
    return i

  def nvmlDeviceGetUUID(self, h):
    return f"GPU-{h}"

  def nvmlDeviceGetUtilizationRates(self, h):
    return types.SimpleNamespace(gpu=(37, 100)[h], memory=0)

  def nvmlDeviceGetMemoryInfo(self, h):
    return types.SimpleNamespace(total=80 << 30, used=(1 << 30) * (h + 1), free=0)

  def nvmlDeviceGetPowerUsage(self, h):
    if h == 1:
      raise self.NVMLError("Not Supported")
    return 215_500  # milliwatts


def _scrape(collector) -> str:
  registry = prom.CollectorRegistry()
  registry.register(collector)
  return prom.generate_latest(registry).decode()


def test_gpu_series_carry_tritons_names_and_units():
  text = _scrape(GpuCollector(_FakeNvml()))
  assert metric(text, "nv_gpu_utilization", gpu_uuid="GPU-0") == pytest.approx(0.37)
  assert metric(text, "nv_gpu_utilization", gpu_uuid="GPU-1") == 1.0
  assert metric(text, "nv_gpu_memory_total_bytes", gpu_uuid="GPU-1") == 80 << 30
  assert metric(text, "nv_gpu_memory_used_bytes", gpu_uuid="GPU-1") == 2 << 30
  assert metric(text, "nv_gpu_power_usage", gpu_uuid="GPU-0") == pytest.approx(215.5)
  assert 'nv_gpu_power_usage{gpu_uuid="GPU-1"}' not in text  # unsupported: absent, not 0


def test_without_nvml_the_gpu_series_are_absent_and_logged_once(caplog):
  collector = GpuCollector(_FakeNvml(fail_init=True))
  with caplog.at_level(logging.DEBUG, logger="serving.telemetry.gpu_metrics"):
    texts = [_scrape(collector) for _ in range(3)]
  assert all("nv_gpu" not in t for t in texts)
  assert [r.levelno for r in caplog.records] == [logging.DEBUG]
  assert "Driver Not Loaded" in caplog.records[0].getMessage()


def test_the_real_nvml_is_absent_on_this_host_without_a_log_per_scrape(caplog):
  with caplog.at_level(logging.DEBUG, logger="serving.telemetry.gpu_metrics"):
    collector = GpuCollector()
    texts = [_scrape(collector) for _ in range(2)]
  if "nv_gpu_memory_total_bytes" in texts[0]:  # a GPU host: then the series are there
    assert metric(texts[0], "nv_gpu_memory_total_bytes") > 0
    return
  assert len(caplog.records) == 1 and "nv_gpu" not in texts[1]
