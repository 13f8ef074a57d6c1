"""The container image, built and run for real: Dockerfile -> image -> a container serving a tiny
exported model on 127.0.0.1, called over gRPC and HTTP with tritonclient, then stopped.

Opt-in (it builds an image: minutes, about 1 GB of disk, network for apt and PyPI):

    XLASERVE_IMAGE_TEST=1 python -m pytest tests/deploy/test_image.py -v -s

It needs podman (or docker: XLASERVE_CONTAINER_ENGINE=docker) and a base image: BASE_IMAGE if
set, else localhost/xlaserve-base:bookworm when present (tools/make_base_image.sh makes it from
Debian packages, about 1 minute; the test runs it itself as root when debootstrap is installed),
else debian:bookworm-slim from a registry. Measured here (2 cores): base 41 s; image 3 to 4 min
cold, about 2 min when only sources changed (the native front end recompiles); the container
part after the build about 10 s. The image is left tagged localhost/xlaserve:test.

Where the engine cannot use its defaults (seen here: no CAP_SYS_RESOURCE, so rootful podman
cannot raise RLIMIT_NOFILE/NPROC for the container; and crun refuses hybrid cgroups v1+v2), it
retries with runc and rlimits at the current ones, and says so.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from deployutil import ROOT

pytestmark = pytest.mark.skipif(os.environ.get("XLASERVE_IMAGE_TEST") != "1",
                                reason="builds a container image: set XLASERVE_IMAGE_TEST=1")
ENGINE = os.environ.get("XLASERVE_CONTAINER_ENGINE", "podman")
LOCAL_BASE = "localhost/xlaserve-base:bookworm"
IMAGE = "localhost/xlaserve:test"
W = np.arange(8, dtype=np.float32).reshape(4, 2)
B = np.array([0.5, -1.0], np.float32)


def _run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"{ENGINE} {' '.join(args)}: exit {proc.returncode}\n"
                         f"{proc.stderr[-4000:]}")
  return proc


def _base_image() -> str:
  if os.environ.get("BASE_IMAGE"):
    return os.environ["BASE_IMAGE"]
  if _run("image", "inspect", LOCAL_BASE, check=False).returncode == 0:
    return LOCAL_BASE
  if os.geteuid() == 0 and shutil.which("debootstrap"):
    subprocess.run([str(ROOT / "tools/make_base_image.sh")], check=True, timeout=900,
                   env={**os.environ, "ENGINE": ENGINE, "IMAGE": LOCAL_BASE})
    return LOCAL_BASE
  return "debian:bookworm-slim"


def _limits() -> list[str]:
  """Container rlimits no higher than this process's own (raising them needs CAP_SYS_RESOURCE)."""
  import resource
  nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
  nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
  return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


@pytest.fixture(scope="module")
def engine_flags() -> list[str]:
  """Flags `run` and `build` need on this machine: none, or runc with the current rlimits."""
  if shutil.which(ENGINE) is None:
    pytest.fail(f"{ENGINE} is not installed (apt-get install podman)")
  base = _base_image()
  for flags in ([], [*(["--runtime", "runc"] if ENGINE == "podman" else []), *_limits()]):
    if _run("run", "--rm", "--network=host", *flags, base, "true", check=False).returncode == 0:
      if flags:
        print(f"\n{ENGINE} needs {' '.join(flags)} here")
      return flags
  pytest.fail(f"{ENGINE} cannot run a container from {base} here: "
              f"{_run('run', '--rm', base, 'true', check=False).stderr}")


@pytest.fixture(scope="module")
def image(engine_flags) -> str:
  t0 = time.perf_counter()
  fmt = ["--format", "docker"] if ENGINE == "podman" else []  # docker format keeps HEALTHCHECK
  _run("build", *fmt, "--network=host", *engine_flags, "--build-arg", f"BASE_IMAGE={_base_image()}",
       "-t", IMAGE, str(ROOT), timeout=1800)
  size = _run("image", "inspect", IMAGE, "--format", "{{.Size}}").stdout.strip()
  print(f"\nbuilt {IMAGE} in {time.perf_counter() - t0:.0f}s, {int(size) / 1e9:.2f} GB")
  return IMAGE


@pytest.fixture()
def repository(tmp_path) -> pathlib.Path:
  """A one-model repository exported by the real exporter: y = x @ W + b (exact in float32)."""
  import jax.numpy as jnp

  import export

  def apply(params, inputs):
    return {"y": inputs["x"] @ params["w"] + params["b"]}

  repo = tmp_path / "repo"
  export.export_model(apply, params={"w": jnp.asarray(W), "b": jnp.asarray(B)}, repository=repo,
                      name="affine", inputs=[export.Input("x", "float32", ("batch", 4))],
                      config=export.ExportConfig(batch_buckets=(1, 8)))
  for path in [tmp_path, *tmp_path.rglob("*")]:
    path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o644)
  return repo


def _logs(container: str) -> str:
  proc = _run("logs", container, check=False)
  return proc.stdout + proc.stderr


def _wait_ready(url: str, container: str, timeout: float = 180) -> None:
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    try:
      with urllib.request.urlopen(url, timeout=2) as r:
        if r.status == 200:
          return
    except (urllib.error.URLError, ConnectionError):
      pass
    state = _run("inspect", container, "--format", "{{.State.Status}}").stdout.strip()
    assert state == "running", _logs(container)
    time.sleep(1)
  raise AssertionError(f"not ready after {timeout}s: {_logs(container)}")


def _call_both_protocols(http: str, grpc: str, metrics: str) -> None:
  """The model over gRPC and over HTTP (binary tensors), answers exact; then the counters."""
  import tritonclient.grpc as tg
  import tritonclient.http as th

  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  gin = tg.InferInput("x", [3, 4], "FP32")
  gin.set_data_from_numpy(x)
  got = tg.InferenceServerClient(grpc).infer("affine", [gin], client_timeout=30).as_numpy("y")
  np.testing.assert_array_equal(got, x @ W + B)
  hin = th.InferInput("x", [3, 4], "FP32")
  hin.set_data_from_numpy(x, binary_data=True)
  got = th.InferenceServerClient(http, network_timeout=30).infer("affine", [hin]).as_numpy("y")
  np.testing.assert_array_equal(got, x @ W + B)
  rows = 'nv_inference_count{model="affine",version="1"} 6.0'
  end = time.monotonic() + 10  # the counters move once a batch's answers are out
  while True:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    if rows in text or time.monotonic() > end:
      break
    time.sleep(0.1)
  assert rows in text, text
  assert 'nv_inference_pending_request_count{model="affine",version="1"} 0.0' in text


def test_image_serves_grpc_and_http_and_stops_cleanly(image, engine_flags, repository, tmp_path):
  """As in deploy/kubernetes: the image's own user, a read-only root file system, the model
  repository mounted read-only, the compile cache on a writable volume; ports published on
  127.0.0.1 only."""
  cache = tmp_path / "cache"
  cache.mkdir()
  os.chmod(cache, 0o777)  # what fsGroup does for a PVC in Kubernetes
  name = f"xlaserve-image-test-{os.getpid()}"
  ports = [a for p in (8000, 8001, 8002) for a in ("-p", f"127.0.0.1::{p}")]
  _run("run", "-d", "--name", name, *engine_flags, *ports, "--read-only",
       "-v", f"{repository}:/models:ro", "-v", f"{cache}:/var/cache/xlaserve", image,
       "--model-repository", "/models")
  try:
    http, grpc, metrics = (_run("port", name, f"{p}/tcp").stdout.split()[0]
                           for p in (8000, 8001, 8002))
    _wait_ready(f"http://{http}/v2/health/ready", name)
    if ENGINE == "podman":  # the image's HEALTHCHECK, run by hand (no systemd timer here)
      assert _run("healthcheck", "run", name, check=False).returncode == 0
    _call_both_protocols(http, grpc, metrics)
    uid = _run("exec", name, "python3", "-c", "import os; print(os.getuid())").stdout.strip()
    assert uid == "1000"
    assert any(cache.rglob("*-cache")), "no compile-cache entries written"
    _run("stop", "-t", "60", name, timeout=90)  # SIGTERM: drain, then exit 0
    state = json.loads(_run("inspect", name, "--format", "{{json .State}}").stdout)
    logs = _logs(name)
    assert state["ExitCode"] == 0, logs
    assert "gRPC front end: native" in logs and "stopped" in logs, logs
  finally:
    _run("rm", "-f", name, check=False)
