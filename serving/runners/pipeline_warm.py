"""Where a pipeline's tensors pass from one model step to the next, and the compiles that takes.

An edge is a model step's output feeding a later model step's input. When both steps' runners
hand over on the device (`on_device`), the copy for every (producer batch shape, consumer batch
shape) pair is compiled by a background thread, inside the repository's warm-up accounting, and
again when a step's runner changes (a reload). Until an edge is compiled its tensors pass
through the host (serving/runners/handoff.py), so no request waits for a compile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Callable, ContextManager

import numpy as np

from bundle import PipelineSpec, Source, TensorSpec, numpy_dtype
from serving.runners.handoff import DeviceRows, Handoff, Key
from serving.types import ServingError

logger = logging.getLogger(__name__)

Warming = Callable[[], ContextManager[Any]]
RETRY_S = 1.0  # how often a step that is not READY yet is looked up again


def on_device(mode: str, device: Any) -> bool:
  """Whether a runner whose hand-off device is `device` hands over there under `mode`."""
  return device is not None and (mode == "device" or
                                 (mode == "auto" and getattr(device, "platform", "cpu") != "cpu"))


def edges(spec: PipelineSpec) -> list[tuple[str, str, Source]]:
  """(consumer step, its input, the source: a model step's output) for every model-to-model edge."""
  models = {s.name for s in spec.steps if s.model is not None}
  return [(step.name, name, src) for step in spec.steps if step.model is not None
          for name, src in step.inputs.items() if src.step in models]


class Edges:
  """A pipeline's model-to-model edges, where each hands over, and the counts of both kinds."""

  def __init__(self, spec: PipelineSpec):
    self.mode, self.handoff, self.all = spec.handoff, Handoff(), edges(spec)
    self.inputs = {(consumer, name) for consumer, name, _ in self.all}
    self.producers = {src.step for _, _, src in self.all}  # model steps feeding model steps

  def on_device(self, device: Any) -> bool:
    """Whether a runner whose hand-off device is `device` hands over there in this pipeline."""
    return on_device(self.mode, device)

  def hand(self, step: str, t: TensorSpec, x: Any, takes_device: bool) -> Any:
    """A step input as its runner takes it: device rows where it takes them (of its dtype),
    else a host array (counted as a host hand-off when a model step produced it)."""
    edge = (step, t.name)
    if (isinstance(x, DeviceRows) and takes_device and t.dtype != "object"
        and x.dtype == numpy_dtype(t.dtype)):
      return x.tagged(self.handoff, edge)
    if edge in self.inputs:
      self.handoff.count(edge, "host")
    return np.asarray(x)


def _rows(runner: Any, tensor: str) -> tuple[int, ...]:
  """The batch row counts a runner assembles or returns `tensor` at: request buckets for a
  context input, batch (candidate) buckets for the rest."""
  engine = getattr(runner, "engine", None)
  if engine is not None and tensor in engine.context_inputs:
    return tuple(engine.request_buckets)
  return tuple(runner.config.buckets)


def edge_keys(mode: str, producer: Any, output: str, consumer: Any, name: str) -> list[Key]:
  """The copies an edge needs compiled: none unless both runners hand over on the device."""
  device = consumer.capabilities.device_inputs
  if not (on_device(mode, producer.capabilities.device_outputs) and on_device(mode, device)):
    return []
  out = next(t for t in producer.outputs if t.name == output)
  into = next(t for t in consumer.inputs if t.name == name)
  return [Handoff.key((p, *out.shape[1:]), numpy_dtype(out.dtype), (c, *into.shape[1:]),
                      numpy_dtype(into.dtype), device)
          for p in _rows(producer, output) for c in _rows(consumer, name)]


class HandoffWarmer:
  """The background thread that keeps a pipeline's device edges compiled."""

  def __init__(self, name: str, spec: PipelineSpec, models: Callable[..., Any], edges: Edges,
               *, warming: Warming | None = None):
    self.name, self.models, self.edges = name, models, edges
    self._warming = warming or contextlib.nullcontext
    self._steps = {s.name: s for s in spec.steps}
    self._watched = {c for c, _, _ in edges.all} | edges.producers
    self._seen: dict[str, Any] = {}
    self._kick, self._stopping = threading.Event(), threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True, name=f"handoff-{name}")

  def start(self) -> None:
    """Starts compiling, unless the pipeline hands nothing over on the device."""
    if self.edges.all and self.edges.mode != "host":
      self._kick.set()
      self._thread.start()

  def stop(self) -> None:
    """Ends the thread after the copy it is compiling (the pipeline stopped)."""
    self._stopping.set()
    self._kick.set()

  def notice(self, step: str, runner: Any) -> None:
    """A request looked up `runner` for `step`: compile for it if it is new (a reload)."""
    if step in self._watched and self._seen.get(step) is not runner:
      self._kick.set()

  def _loop(self) -> None:
    while not self._stopping.is_set():
      self._kick.wait()
      self._kick.clear()
      if not self._stopping.is_set() and not self.warm_all():
        self._stopping.wait(RETRY_S)
        self._kick.set()

  def warm_all(self) -> bool:
    """Compiles every edge's missing copies; False while a step is not READY."""
    runners: dict[str, Any] = {}
    try:
      for step in self._watched:
        s = self._steps[step]
        runners[step] = self.models(s.model, s.version)
    except ServingError:
      return False
    with self._warming():
      for consumer, name, src in self.edges.all:
        for key in edge_keys(self.edges.mode, runners[src.step], src.tensor.split(".", 1)[1],
                             runners[consumer], name):
          try:
            self.edges.handoff.warm(key)
          except Exception:  # that edge keeps handing over on the host
            logger.exception("%s: compiling the hand-off %s -> %s.%s failed", self.name,
                             src.tensor, consumer, name)
    self._seen.update(runners)
    return True
