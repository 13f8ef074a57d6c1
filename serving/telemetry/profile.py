"""On-demand profiles of a running server: a `jax.profiler` trace (Perfetto/TensorBoard) and a
per-stage breakdown of the requests served while it ran.

While a capture runs, the runners' observers and the Python front ends hand their timings to a
`StageRecorder` (nothing is recorded otherwise: one attribute test per batch). The breakdown
names each stage of a request's path, its p50/p99, and the device's busy fraction (the union of
the intervals in which a batch was in flight, over the window), and says whether the model looks
launch-, host- or compute-bound.
"""

from __future__ import annotations

import dataclasses
import pathlib
import threading
import time
from typing import Any, Sequence

import numpy as np

STAGES = ("front_end", "queue", "assembly", "compute", "encode")
STAGE_HELP = {
    "front_end": "Python front ends: receive to queued (decode, validation); the native front"
                 " end parses in C++ and counts it in queue",
    "queue": "per request: queued (native: read) to its batch starting",
    "assembly": "per batch: copying requests' rows into the bucket's input arrays",
    "compute": "per batch: dispatch to outputs on the host (device time, transfers, waiting on"
               " the batch before it)",
    "encode": "per batch: splitting outputs into answers and handing them to the front end"
              " (the native front end encodes and sends here)",
}
MAX_SAMPLES = 200_000  # per stage and model: a long capture keeps the first this many


def model_key(model: str, version: int | str) -> str:
  """How a breakdown names a served version."""
  return f"{model} v{version}"


@dataclasses.dataclass
class _ModelRecord:
  stages: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {s: [] for s in STAGES})
  intervals: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  rows: int = 0
  requests: int = 0


class StageRecorder:
  """Collects stage durations (seconds) per model for one capture; thread-safe."""

  def __init__(self) -> None:
    self.started = time.perf_counter()
    self._lock = threading.Lock()
    self._models: dict[str, _ModelRecord] = {}

  def _model(self, model: str) -> _ModelRecord:
    rec = self._models.get(model)
    if rec is None:
      rec = self._models[model] = _ModelRecord()
    return rec

  def add(self, model: str, stage: str, seconds: Sequence[float]) -> None:
    """Per-request or per-batch durations of one stage."""
    with self._lock:
      kept = self._model(model).stages[stage]
      kept.extend(seconds[:max(0, MAX_SAMPLES - len(kept))])

  def batch(self, model: str, *, start: float, done: float, rows: int, requests: int,
            assembly_s: float, encode_s: float) -> None:
    """One batch: in flight on the device from `start` to `done` (perf_counter seconds), its
    compute stage, recorded with it so that a window never sees one without the other."""
    with self._lock:
      rec = self._model(model)
      rec.rows += rows
      rec.requests += requests
      if len(rec.intervals) < MAX_SAMPLES:
        rec.intervals.append((start, done))
        rec.stages["compute"].append(done - start)
        rec.stages["assembly"].append(assembly_s)
        rec.stages["encode"].append(encode_s)

  def report(self, until: float | None = None) -> dict[str, Any]:
    """The breakdown of everything recorded between the start and `until` (default now)."""
    end = time.perf_counter() if until is None else until
    window = max(end - self.started, 1e-9)
    with self._lock:
      models = {m: dataclasses.replace(r, stages={k: list(v) for k, v in r.stages.items()},
                                       intervals=list(r.intervals))
                for m, r in self._models.items()}
    out: dict[str, Any] = {"window_s": window, "models": {}}
    every: list[tuple[float, float]] = []
    for name, rec in sorted(models.items()):
      every += rec.intervals
      busy = busy_seconds(rec.intervals, self.started, end) / window
      stages = {s: summarize(v) for s, v in rec.stages.items()}
      out["models"][name] = {"requests": rec.requests, "rows": rec.rows,
                             "batches": len(rec.intervals), "busy_fraction": busy,
                             "stages": stages, "verdict": verdict(stages, busy)}
    out["busy_fraction"] = busy_seconds(every, self.started, end) / window
    return out


def summarize(values: Sequence[float]) -> dict[str, float]:
  """count, p50, p99 and mean of durations in seconds (zeros when there are none)."""
  if not len(values):
    return {"count": 0, "p50": 0.0, "p99": 0.0, "mean": 0.0}
  a = np.asarray(values, dtype=np.float64)
  p50, p99 = np.percentile(a, [50, 99])
  return {"count": int(a.size), "p50": float(p50), "p99": float(p99), "mean": float(a.mean())}


def busy_seconds(intervals: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
  """Length of the union of `intervals` clipped to [lo, hi]."""
  if not intervals:
    return 0.0
  a = np.clip(np.asarray(sorted(intervals), dtype=np.float64), lo, hi)
  total, cur_s, cur_e = 0.0, a[0, 0], a[0, 1]
  for s, e in a[1:]:
    if s > cur_e:
      total += cur_e - cur_s
      cur_s, cur_e = s, e
    else:
      cur_e = max(cur_e, e)
  return float(total + cur_e - cur_s)


def verdict(stages: dict[str, dict[str, float]], busy: float) -> str:
  """A one-line reading of a model's breakdown: what bounds it."""
  if stages["compute"]["count"] == 0:
    return "idle: no batches ran in the window"
  host = sum(stages[s]["mean"] for s in ("assembly", "encode")) + stages["front_end"]["mean"]
  compute = stages["compute"]["p50"]
  if busy >= 0.8:
    return (f"compute-bound: the device is busy {busy:.0%} of the time; more throughput needs a"
            " faster model, larger buckets or more devices")
  if compute < 1e-3 and host < compute:
    return (f"launch-bound: batches are short (compute p50 {compute * 1e3:.2f} ms) and the"
            f" device idles {1 - busy:.0%}; larger buckets or a longer max_queue_delay amortise"
            " the per-batch cost")
  return (f"host-bound: the device idles {1 - busy:.0%} of the time while host stages take"
          f" {host * 1e3:.2f} ms per batch/request; add front-end capacity or clients, or"
          " profile the host path")


class Profiler:
  """Runs one capture at a time: the recorder goes to `hub` for `seconds`, a jax.profiler trace
  into a fresh folder under `root`."""

  def __init__(self, hub: Any, root: pathlib.Path):
    self.hub, self.root = hub, pathlib.Path(root)
    self._busy = threading.Lock()

  def capture(self, seconds: float, *, trace: bool = True, python: bool = False
              ) -> dict[str, Any]:
    """Blocks for `seconds`; returns the breakdown and where the trace went. RuntimeError when a
    capture is already running."""
    if not self._busy.acquire(blocking=False):
      raise RuntimeError("a profile capture is already running; wait for it to finish")
    try:
      return self._capture(seconds, trace, python)
    finally:
      self._busy.release()

  def _capture(self, seconds: float, trace: bool, python: bool) -> dict[str, Any]:
    import jax  # the server has it loaded already; the telemetry module must not import it early

    folder = self.root / time.strftime("%Y%m%d-%H%M%S")
    if trace:
      folder.mkdir(parents=True, exist_ok=True)
      options = jax.profiler.ProfileOptions()
      # Python's tracer hooks every call of every thread: it slows serving and makes stopping
      # take seconds per second captured. Off unless asked for.
      options.python_tracer_level = 1 if python else 0
      jax.profiler.start_trace(str(folder), profiler_options=options)
    self.hub.flush()  # metrics a native queue still holds: earlier requests' are not this capture's
    recorder = StageRecorder()
    self.hub.recorder = recorder
    try:
      time.sleep(seconds)
    finally:
      self.hub.flush()
      self.hub.recorder = None
      out = recorder.report()
      if trace:
        t = time.perf_counter()
        jax.profiler.stop_trace()
        out["trace_stop_s"] = time.perf_counter() - t
    out["trace_dir"] = str(folder) if trace else None
    # The Chrome-format trace (TensorBoard's trace viewer; `xlaserve profile --out` makes a
    # Perfetto copy on the client, so the server never parses a large trace while it serves).
    found = sorted(folder.rglob("*.trace.json.gz")) if trace else []
    out["trace_file"] = str(found[-1]) if found else None
    out["stage_help"] = STAGE_HELP
    return out
