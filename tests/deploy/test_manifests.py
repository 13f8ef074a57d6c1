"""deploy/ checked offline: every object validates against the published schemas (Kubernetes'
via kubernetes-validate, KServe's CRDs as released), a broken copy of each kind fails, and the
numbers agree with the server they deploy (its flags as `xlaserve serve` parses them, its
metric names, the Dockerfile's user and ports). Takes a few seconds; no cluster needed.
"""

from __future__ import annotations

import copy
import pathlib
import re
import shlex
import shutil
import subprocess

import pytest
import yaml

from deployutil import (DEPLOY, ROOT, Schemas, all_objects, dockerfile_uid, kustomize_folders,
                        object_files, one, patch_files, render)
from serving import cli

OBJECTS = all_objects()
DEPLOYMENTS = {f: one(objs, "Deployment") for f, objs in OBJECTS.items()
               if f.endswith("(kustomize)")}
RUNTIME = one(OBJECTS["deploy/kserve/servingruntime.yaml"], "ClusterServingRuntime")
ISVCS = {f: one(objs, "InferenceService") for f, objs in OBJECTS.items() if "inferenceservice" in f}
READY, LIVE = "/v2/health/ready", "/v2/health/live"
PENDING = "nv_inference_pending_request_count"


@pytest.fixture(scope="module")
def schemas() -> Schemas:
  return Schemas.load()


# -- schemas ------------------------------------------------------------------------------------

def test_deploy_has_every_kind():
  kinds = {o["kind"] for objs in OBJECTS.values() for o in objs}
  assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                   "PersistentVolumeClaim", "ClusterServingRuntime", "InferenceService"}
  assert len(ISVCS) == 2 and len(DEPLOYMENTS) == 2  # CPU and GPU of each


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_every_object_validates(schemas, name):
  for obj in OBJECTS[name]:
    assert schemas.errors(obj) == [], f"{name}: {obj['kind']} {obj['metadata']['name']}"


def _set(path: str, value):
  def mutate(obj):
    *parents, last = path.split(".")
    node = obj
    for key in parents:
      node = node[int(key)] if key.isdigit() else node[key]
    if value is _DELETE:
      del node[int(last) if last.isdigit() else last]
    else:
      node[int(last) if last.isdigit() else last] = value
  return mutate


_DELETE = object()
_C = "spec.template.spec.containers.0"
BROKEN = [  # (file, kind, what is wrong, mutation, words the error must contain)
    ("deploy/kubernetes/base/deployment.yaml", "Deployment", "wrong type",
     _set("spec.replicas", "two"), "not of type"),
    ("deploy/kubernetes/base/deployment.yaml", "Deployment", "unknown field",
     _set(f"{_C}.startupProbe.timeout", 5), "'timeout' was unexpected"),
    ("deploy/kubernetes/base/deployment.yaml", "Deployment", "missing required",
     _set("spec.selector", _DELETE), "'selector' is a required property"),
    ("deploy/kubernetes/base/service.yaml", "Service", "wrong type",
     _set("spec.ports.0.port", "8000"), "not of type"),
    ("deploy/kubernetes/base/service.yaml", "Service", "unknown field",
     _set("spec.ports.0.containerPort", 8000), "'containerPort' was unexpected"),
    ("deploy/kubernetes/base/service.yaml", "Service", "missing required",
     _set("spec.ports.0.port", _DELETE), "'port' is a required property"),
    ("deploy/kubernetes/base/hpa.yaml", "HorizontalPodAutoscaler", "wrong type",
     _set("spec.maxReplicas", "10"), "not of type"),
    ("deploy/kubernetes/base/hpa.yaml", "HorizontalPodAutoscaler", "unknown field",
     _set("spec.metrics.0.pods.metricName", PENDING), "'metricName' was unexpected"),
    ("deploy/kubernetes/base/hpa.yaml", "HorizontalPodAutoscaler", "missing required",
     _set("spec.scaleTargetRef", _DELETE), "'scaleTargetRef' is a required property"),
    ("deploy/kubernetes/base/pdb.yaml", "PodDisruptionBudget", "wrong type",
     _set("spec.maxUnavailable", [1]), "not valid under any of the given schemas"),
    ("deploy/kubernetes/base/pdb.yaml", "PodDisruptionBudget", "unknown field",
     _set("spec.minAvailabe", 1), "'minAvailabe' was unexpected"),
    ("deploy/kubernetes/base/pdb.yaml", "PodDisruptionBudget", "missing required",
     _set("spec.selector.matchExpressions", [{"key": "a", "values": ["b"]}]),
     "'operator' is a required property"),
    ("deploy/kubernetes/base/pvc.yaml", "PersistentVolumeClaim", "wrong type",
     _set("spec.accessModes", "ReadWriteMany"), "not of type"),
    ("deploy/kubernetes/base/pvc.yaml", "PersistentVolumeClaim", "unknown field",
     _set("spec.storageClass", "standard"), "'storageClass' was unexpected"),
    ("deploy/kserve/servingruntime.yaml", "ClusterServingRuntime", "wrong type",
     _set("spec.supportedModelFormats.0.autoSelect", "yes"), "not of type"),
    ("deploy/kserve/servingruntime.yaml", "ClusterServingRuntime", "unknown field",
     _set("spec.containers.0.startupProbe.httpGet.url", READY), "'url' was unexpected"),
    ("deploy/kserve/servingruntime.yaml", "ClusterServingRuntime", "missing required",
     _set("spec.containers", _DELETE), "'containers' is a required property"),
    ("deploy/kserve/servingruntime.yaml", "ClusterServingRuntime", "unknown metadata field",
     _set("metadata.label", {"a": "b"}), "'label' was unexpected"),
    ("deploy/kserve/inferenceservice.yaml", "InferenceService", "wrong type",
     _set("spec.predictor.minReplicas", "2"), "not of type"),
    ("deploy/kserve/inferenceservice.yaml", "InferenceService", "unknown field",
     _set("spec.predictor.model.storageURI", "gs://b/r"), "'storageURI' was unexpected"),
    ("deploy/kserve/inferenceservice.yaml", "InferenceService", "missing required",
     _set("spec.predictor.model.modelFormat.name", _DELETE), "'name' is a required property"),
]


@pytest.mark.parametrize("name,kind,what,mutate,needle", BROKEN,
                         ids=[f"{k}-{w.replace(' ', '_')}" for _, k, w, _, _ in BROKEN])
def test_a_broken_copy_fails(schemas, name, kind, what, mutate, needle):
  broken = copy.deepcopy(next(o for o in OBJECTS[name] if o["kind"] == kind))
  mutate(broken)
  errors = schemas.errors(broken)
  assert any(needle in e for e in errors), f"{what} in {kind} was not caught: {errors}"


def test_every_kind_has_broken_copies():
  kinds = {o["kind"] for objs in OBJECTS.values() for o in objs}
  assert kinds == {kind for _, kind, _, _, _ in BROKEN}


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl (with kustomize) is not installed")
@pytest.mark.parametrize("folder", kustomize_folders(), ids=lambda p: p.name)
def test_render_matches_kubectl_kustomize(folder):
  """The test's renderer (resources + RFC 6902 patches) prints what kustomize itself prints."""
  out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True,
                       timeout=60, check=True).stdout
  key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
  assert sorted(yaml.safe_load_all(out), key=key) == sorted(render(folder), key=key)


# -- the server these objects run ---------------------------------------------------------------

def _servers() -> list[tuple[str, dict, dict, dict]]:
  """(name, pod spec, container, pod annotations) of every container that runs the server; an
  InferenceService's is its runtime's container with the service's args appended, as KServe
  merges them, in a pod with the service's pod-level fields."""
  out = [(f, d["spec"]["template"]["spec"], d["spec"]["template"]["spec"]["containers"][0],
          d["spec"]["template"]["metadata"].get("annotations", {})) for f, d in DEPLOYMENTS.items()]
  runtime = RUNTIME["spec"]["containers"][0]
  for f, isvc in ISVCS.items():
    model = isvc["spec"]["predictor"]["model"]
    container = {**runtime, "args": runtime["args"] + model.get("args", [])}
    pod = {**isvc["spec"]["predictor"], "volumes": RUNTIME["spec"].get("volumes", [])}
    out.append((f, pod, container, RUNTIME["spec"]["annotations"]))
  return out


SERVERS = _servers()
server_cases = pytest.mark.parametrize("name,pod,container,annotations", SERVERS,
                                       ids=[s[0] for s in SERVERS])


def _config(container: dict):
  command = container["command"]
  assert command[:2] == ["xlaserve", "serve"], command
  argv = ["serve", *command[2:], *container.get("args", [])]
  try:
    args = cli.build_parser().parse_args(argv)
  except SystemExit:
    pytest.fail(f"`xlaserve {shlex.join(argv)}` does not parse (see stderr above)")
  return args, cli.server_config(args, args.model_repository, None)


def _port(container: dict, port) -> int:
  """A probe's or Service's port (a number, or a container port's name) as a number."""
  if isinstance(port, int):
    return port
  named = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
  assert port in named, f"no container port named {port!r}: {named}"
  return named[port]


@server_cases
def test_server_flags_are_real_and_listen_on_all_interfaces(name, pod, container, annotations):
  args, config = _config(container)
  assert config.host == "0.0.0.0"
  assert config.tls_cert_file is None  # the probes below speak plain HTTP
  assert min(config.http_port, config.grpc_port, config.metrics_port) > 0


@server_cases
def test_ports_are_the_ones_the_server_opens(name, pod, container, annotations):
  _, config = _config(container)
  declared = {p["containerPort"] for p in container["ports"]}
  assert {config.http_port, config.grpc_port} <= declared
  assert declared <= {config.http_port, config.grpc_port, config.metrics_port}
  scrape = {v for k, v in annotations.items() if re.fullmatch(r"prometheus\.[\w.]+/port", k)}
  assert scrape == {str(config.metrics_port)}, annotations
  assert annotations["prometheus.io/scrape"] == "true"
  assert annotations["prometheus.io/path"] == "/metrics"


@server_cases
def test_probes_hit_the_health_endpoints(name, pod, container, annotations):
  """Startup and readiness on /v2/health/ready (true once warmed up, false when draining),
  liveness on /v2/health/live, all on the server's HTTP port; warm-up gets >= 10 minutes."""
  _, config = _config(container)
  for probe, path in (("startupProbe", READY), ("readinessProbe", READY), ("livenessProbe", LIVE)):
    get = container[probe]["httpGet"]
    assert get["path"] == path and _port(container, get["port"]) == config.http_port, probe
    assert get.get("scheme", "HTTP") == "HTTP"
  startup = container["startupProbe"]
  assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_the_server_answers_the_probes_and_exports_the_scaling_metric(tmp_path):
  """The real server (a mock engine behind it) answers 200 on every path a probe uses, and
  /metrics carries the HPA's metric for a served model."""
  import urllib.request

  from clientutil import serving, write_engine_bundle
  from serving.engines.mock import MockEngine

  write_engine_bundle(tmp_path, "mock", MockEngine())
  paths = {c[p]["httpGet"]["path"] for _, _, c, _ in SERVERS
           for p in ("startupProbe", "readinessProbe", "livenessProbe")}
  factory = lambda path, manifest, cfg: MockEngine(buckets=manifest.batch_buckets)  # noqa: E731
  # frontend="python": which gRPC front end serves does not matter to the HTTP paths.
  with serving(tmp_path, factory, http_port=0, metrics_port=0, frontend="python") as bg:
    for path in sorted(paths):
      with urllib.request.urlopen(f"http://127.0.0.1:{bg.server.http_port}{path}", timeout=10) as r:
        assert r.status == 200, path
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{bg.server.metrics_port}/metrics",
                                     timeout=10).read().decode()
  assert re.search(rf'^{PENDING}{{model="mock",version="1"}} 0\.0$', metrics, re.M), metrics


def _prestop_sleep(container: dict) -> int:
  pre = container["lifecycle"]["preStop"]
  if "sleep" in pre:
    return pre["sleep"]["seconds"]
  command = pre["exec"]["command"]
  assert pathlib.PurePath(command[0]).name == "sleep" and len(command) == 2, command
  return int(command[1])


@server_cases
def test_termination_grace_covers_prestop_and_drain(name, pod, container, annotations):
  """Kubernetes kills the pod terminationGracePeriodSeconds after it starts stopping it: the
  preStop sleep and then the server's drain of accepted requests must both fit."""
  _, config = _config(container)
  sleep = _prestop_sleep(container)
  assert sleep >= 5  # time for endpoints to leave the load balancers
  assert pod["terminationGracePeriodSeconds"] > sleep + config.shutdown_grace_s


@server_cases
def test_runs_as_the_images_user_with_writable_paths(name, pod, container, annotations):
  args, _ = _config(container)
  sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
  assert sc["runAsNonRoot"] is True and sc["runAsUser"] == dockerfile_uid()
  assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
  mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
  volumes = {v["name"] for v in pod["volumes"]}
  assert {m["name"] for m in mounts.values()} <= volumes
  if sc.get("readOnlyRootFilesystem"):
    assert "/tmp" in mounts  # the native front end's unix socket
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    assert any(args.compile_cache.startswith(p + "/") for p in writable), args.compile_cache
  if "kserve" in name:  # KServe's storage initializer fills /mnt/models
    assert args.model_repository == "/mnt/models"
  else:
    assert args.model_repository in mounts


# -- scaling, the Service, the KServe runtime ---------------------------------------------------

def test_hpa_scales_the_deployment_on_queue_depth():
  from serving.telemetry.metrics import Metrics
  hpa = one(OBJECTS["deploy/kubernetes/base/hpa.yaml"], "HorizontalPodAutoscaler")
  dep = DEPLOYMENTS["deploy/kubernetes/base/ (kustomize)"]
  ref = hpa["spec"]["scaleTargetRef"]
  assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
  [metric] = hpa["spec"]["metrics"]
  assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == PENDING
  assert f"# TYPE {PENDING} gauge" in _exposition(Metrics(compile_count=lambda: 0).registry)
  assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def _exposition(registry) -> str:
  import prometheus_client
  return prometheus_client.generate_latest(registry).decode()


@pytest.mark.parametrize("name", sorted(ISVCS))
def test_inference_service_scales_on_queue_depth_of_its_pods(name):
  isvc = ISVCS[name]
  [metric] = isvc["spec"]["predictor"]["autoScaling"]["metrics"]
  query = metric["external"]["metric"]["query"]
  assert PENDING in query and f'pod=~"{isvc["metadata"]["name"]}-predictor-' in query
  assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "keda"


def test_service_and_pdb_select_the_pods_and_name_their_ports():
  base = OBJECTS["deploy/kubernetes/base/ (kustomize)"]
  dep, svc, pdb = (one(base, k) for k in ("Deployment", "Service", "PodDisruptionBudget"))
  labels = dep["spec"]["template"]["metadata"]["labels"]
  for selector in (svc["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"],
                   dep["spec"]["selector"]["matchLabels"]):
    assert selector.items() <= labels.items()
  container = dep["spec"]["template"]["spec"]["containers"][0]
  _, config = _config(container)
  ports = {p["name"]: _port(container, p["targetPort"]) for p in svc["spec"]["ports"]}
  assert ports == {"http": config.http_port, "grpc": config.grpc_port,
                   "metrics": config.metrics_port}
  claims = {o["metadata"]["name"] for o in base if o["kind"] == "PersistentVolumeClaim"}
  volumes = dep["spec"]["template"]["spec"]["volumes"]
  used = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
  assert used == claims


def test_rollout_never_drops_below_the_replica_count():
  """A pod warms up before it serves: an old one may go only once its successor is ready."""
  strategies = [d["spec"]["strategy"] for d in DEPLOYMENTS.values()]
  strategies += [i["spec"]["predictor"]["deploymentStrategy"] for i in ISVCS.values()]
  for strategy in strategies:
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("name", sorted(ISVCS))
def test_inference_service_uses_the_runtime(name):
  model = ISVCS[name]["spec"]["predictor"]["model"]
  formats = {f["name"] for f in RUNTIME["spec"]["supportedModelFormats"]}
  assert formats == {"xlaserve-bundle"} and model["modelFormat"]["name"] in formats
  assert model["runtime"] == RUNTIME["metadata"]["name"]
  assert RUNTIME["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
  assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
  assert re.fullmatch(r"(gs|s3|pvc|https?)://\S+", model["storageUri"])


def test_gpu_variants_ask_for_a_gpu_and_run_the_cuda_image():
  gpu_dep = DEPLOYMENTS["deploy/kubernetes/gpu/ (kustomize)"]["spec"]["template"]["spec"]
  gpu_model = ISVCS["deploy/kserve/inferenceservice-gpu.yaml"]["spec"]["predictor"]["model"]
  for resources in (gpu_dep["containers"][0]["resources"], gpu_model["resources"]):
    assert resources["limits"]["nvidia.com/gpu"] == 1
  assert gpu_dep["containers"][0]["image"].endswith("-cuda")
  assert gpu_model["runtimeVersion"].endswith("-cuda")  # KServe swaps it in as the image tag
  cpu_dep = DEPLOYMENTS["deploy/kubernetes/base/ (kustomize)"]["spec"]["template"]["spec"]
  assert "nvidia.com/gpu" not in str(cpu_dep) and "nvidia.com/gpu" not in str(RUNTIME)


def test_every_yaml_under_deploy_is_checked():
  """Object files validate directly; kustomizations and their patches through the rendering."""
  checked = {str(p.relative_to(ROOT)) for p in object_files()} | {
      str(p.relative_to(ROOT)) for p in patch_files()}
  checked |= {str(f.relative_to(ROOT) / "kustomization.yaml") for f in kustomize_folders()}
  assert {str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*.y*ml")} == checked
  assert {str(p.relative_to(ROOT)) for p in object_files()} <= set(OBJECTS)
