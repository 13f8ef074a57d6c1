"""The servicer's canary step: routes unversioned requests of a model with a traffic split, and
offers answered live requests to its shadow version.

A request that names a version goes to that version (no split, no shadow: those are for live
traffic). An unversioned request of a model with a split goes where `traffic.pick` sends it: the
sticky parameter's hash, or a random point without it, over the ready versions' weights. The
native gRPC front end routes such models' unversioned requests itself by the same rule
(serving/frontend/native/split.cc) and relays the share drawn for the shadow here, marked
(`SHADOW_MARKER`); every other request of theirs (HTTP, JSON tensors, ...) is routed here.
"""

from __future__ import annotations

import random
import threading
from typing import Any, Callable, Mapping

import numpy as np

from serving.frontend import codec
from serving.frontend.shadow import ShadowScorer
from serving.repository import ModelRepository, ServedVersion, State
from serving.repository.traffic import pick, sticky_point
from serving.runners import Runner
from serving.types import Code, ServingError


SHADOW_MARKER = "x-xlaserve-shadow"  # the native front end's mark: drawn for the shadow


def shadow_marked(context: Any) -> bool:
  """Whether a relayed gRPC call carries the native split's shadow mark."""
  return any(k == SHADOW_MARKER and v == "1" for k, v in (context.invocation_metadata() or ()))


class Canary:
  """Traffic splits and shadow scoring over one repository; counts requests per split version."""

  def __init__(self, repository: ModelRepository, *, seed: int | None = None):
    self.repo = repository
    self.shadow = ShadowScorer(seed=seed)
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._routed: dict[tuple[str, int], int] = {}
    self.native_routed: Callable[[], Mapping[tuple[str, int], int]] | None = None

  def route(self, request: Any) -> tuple[ServedVersion, Runner] | None:
    """The version (and its runner) the split picks for `request` (a ModelInferRequest or the
    HTTP front end's equivalent); None when it names a version or its model has no split."""
    if request.model_version:
      return None
    name = request.model_name
    traffic = self.repo.traffic.get(name)[0]
    if traffic is None:
      return None
    ready = {r.version: r for r in self.repo.versions_of(name)
             if r.state is State.READY and r.runner is not None}
    key = _sticky_key(request.parameters, traffic.sticky_parameter)
    version = pick(traffic.weights, ready, sticky_point(key) if key is not None
                   else self._rng.random())
    rec = ready.get(version) if version is not None else None
    runner = rec.runner if rec is not None else None
    if runner is None:
      raise ServingError(Code.UNAVAILABLE, f"model {name!r}: no version of its traffic split"
                         f" {list(traffic.versions)} is ready (ready: {sorted(ready)}); name a"
                         " version, or wait for the split's versions to load")
    with self._lock:
      self._routed[(name, version)] = self._routed.get((name, version), 0) + 1
    return rec, runner

  def answered(self, request: Any, rec: ServedVersion, runner: Runner,
               arrays: Mapping[str, np.ndarray], rows: int, outputs: Mapping[str, np.ndarray],
               request_id: str, *, sampled: bool = False) -> None:
    """After an answer: offers a live (unversioned) request of a model with a shadow to it
    (`sampled`: the native front end's split already drew it for the shadow)."""
    if request.model_version:
      return
    shadow = self.repo.traffic.get(rec.name)[1]
    if shadow is not None:
      self.shadow.offer(self.repo, rec, runner, shadow, arrays, rows, outputs, request_id,
                        sampled=sampled)

  def routed(self) -> dict[tuple[str, int], int]:
    """(model, version) -> unversioned requests the split sent there (here and, through
    `native_routed`, in the native front end)."""
    with self._lock:
      out = dict(self._routed)
    for key, n in (self.native_routed() if self.native_routed is not None else {}).items():
      out[key] = out.get(key, 0) + n
    return out

  def report(self, model: str) -> dict[str, Any]:
    """The JSON of GET /v2/models/<model>/shadow: the split and shadow settings, requests per
    split version, the shadow's counts and every comparison of its versions."""
    self.repo.check_name(model)
    if not self.repo.versions_of(model):
      raise ServingError(Code.NOT_FOUND, f"model {model!r} is not in the repository")
    traffic, shadow = self.repo.traffic.get(model)
    routed = {str(v): n for (m, v), n in sorted(self.routed().items()) if m == model}
    counts = [{"shadow_version": v, "submitted": c.submitted, "dropped": c.dropped,
               "failed": c.failed, "inflight": c.inflight, "last_error": c.last_error}
              for (m, v), c in sorted(self.shadow.counts().items()) if m == model]
    return {
        "model": model,
        "traffic": None if traffic is None else {
            "versions": {str(v): w for v, w in traffic.weights},
            "sticky_parameter": traffic.sticky_parameter, "requests": routed},
        "shadow": None if shadow is None else {
            "version": shadow.version, "fraction": shadow.fraction,
            "queue_requests": shadow.queue_requests, "output": shadow.output},
        "shadow_counts": counts,
        "comparisons": [{"primary_version": p, "shadow_version": s, **r}
                        for (_, p, s), r in self.shadow.comparisons(model).items()],
    }

  def snapshot(self) -> dict[str, Any]:
    """Plain data for the metrics collector (serving/telemetry/canary_metrics.py)."""
    return {"routed": self.routed(),
            "shadow": {k: (c.submitted, c.dropped, c.failed, c.inflight)
                       for k, c in self.shadow.counts().items()},
            "comparisons": self.shadow.comparisons()}


def _sticky_key(parameters: Mapping[str, Any], name: str | None) -> str | None:
  """The request's value of the sticky parameter as a string, or None when it has none."""
  if name is None or name not in parameters:
    return None
  value = codec.param_value(parameters[name])
  return None if value is None or value == "" else str(value)
