"""Shadow scoring: a fraction of live requests is also scored by a candidate version that never
answers, and its scores are compared with the served version's on the same rows.

After the served (primary) version has answered, the servicer offers the request here. With
probability `fraction` its decoded inputs are submitted to the shadow version's runner with this
object as the completion sink, so nothing of the shadow reaches the client and the client never
waits for it. At most `queue_requests` shadow requests per model are in flight; over the bound a
request is dropped and counted, as is a refusal by the shadow's own queue. Failures are counted
(and the last one kept for the report), never surfaced. Answers are compared per (model, primary
version, shadow version) by serving/telemetry/shadow_compare.py.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import Any, Mapping

import numpy as np

from serving.repository import ModelRepository, ServedVersion
from serving.repository.traffic import ShadowConfig
from serving.runners import Runner
from serving.telemetry.shadow_compare import ScoreComparison
from serving.types import Code, Completion, InferRequest, ServingError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class ShadowCounts:
  """What happened to the requests offered to one (model, shadow version)."""

  submitted: int = 0
  dropped: int = 0  # over the in-flight bound, or refused by the shadow's queue
  failed: int = 0  # the shadow answered with an error, or its scores could not be compared
  inflight: int = 0
  last_error: str = ""


class ShadowScorer:
  """Submits shadow requests and compares their answers; the sink of those requests."""

  def __init__(self, *, reservoir_rows: int = 4096, seed: int | None = None):
    self.reservoir_rows = reservoir_rows
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self._counts: dict[tuple[str, int], ShadowCounts] = {}
    self._comparisons: dict[tuple[str, int, int], ScoreComparison] = {}

  def offer(self, repo: ModelRepository, rec: ServedVersion, runner: Runner, cfg: ShadowConfig,
            arrays: Mapping[str, np.ndarray], rows: int, outputs: Mapping[str, np.ndarray],
            request_id: str, *, sampled: bool = False) -> None:
    """Called once the primary `rec` (served by `runner`) answered `arrays` with `outputs`;
    never raises, never waits for the shadow. `sampled`: already drawn at `fraction` (by the
    native front end's split), so it is scored without a second draw."""
    if rec.version == cfg.version or (not sampled and cfg.fraction < 1
                                      and self._rng.random() >= cfg.fraction):
      return
    key = (rec.name, cfg.version)
    with self._lock:
      counts = self._counts.setdefault(key, ShadowCounts())
      if counts.inflight >= cfg.queue_requests:
        counts.dropped += 1
        return
      counts.inflight += 1
      counts.submitted += 1
    try:
      shadow = repo.get(rec.name, cfg.version).runner
      if shadow is None:
        raise ServingError(Code.UNAVAILABLE, f"version {cfg.version} was just unloaded")
      output = cfg.output or runner.outputs[0].name
      if output not in outputs or output not in {t.name for t in shadow.outputs}:
        raise ServingError(Code.INVALID_ARGUMENT, f"shadow.output {output!r} is not an output"
                           f" of both versions {rec.version} and {cfg.version}")
      primary = _scores(outputs[output], rows, output)
      shadow.submit(InferRequest(
          inputs=arrays, rows=rows, sink=self, arrival=time.perf_counter(), priority=1 << 30,
          request_id=f"{request_id}/shadow",
          sink_token=(rec.name, rec.version, cfg.version, output, primary)))
    except ServingError as e:  # a full shadow queue drops; anything else fails
      exhausted = e.code is Code.RESOURCE_EXHAUSTED
      self._finish(key, None if exhausted else e.message, dropped=exhausted)
    except Exception as e:  # a bug here must never reach the client
      logger.exception("%s: shadow submission failed", rec.name)
      self._finish(key, f"{type(e).__name__}: {e}")

  def _finish(self, key: tuple[str, int], error: str | None, *, dropped: bool = False) -> None:
    with self._lock:
      counts = self._counts[key]
      counts.inflight -= 1
      if dropped:
        counts.dropped += 1
        counts.submitted -= 1
      elif error is not None:
        counts.failed += 1
        counts.last_error = error

  def complete(self, completions: list[Completion]) -> None:
    """Runner thread: compares each shadow answer with its primary's scores; never raises."""
    for req, out, err in completions:
      model, primary_version, version, output, primary = req.sink_token
      error = None if err is None else f"{err.code.value}: {err.message}"
      try:
        if error is None:
          comparison = self._comparison(model, primary_version, version)
          comparison.add(primary, _scores(out[output], req.rows, output))
      except Exception as e:  # e.g. the shadow's output has another shape
        error = f"{type(e).__name__}: {getattr(e, 'message', e)}"
      self._finish((model, version), error)

  def _comparison(self, model: str, primary: int, shadow: int) -> ScoreComparison:
    with self._lock:
      key = (model, primary, shadow)
      if key not in self._comparisons:
        self._comparisons[key] = ScoreComparison(self.reservoir_rows)
      return self._comparisons[key]

  def counts(self) -> dict[tuple[str, int], ShadowCounts]:
    """(model, shadow version) -> a copy of its counts."""
    with self._lock:
      return {k: dataclasses.replace(v) for k, v in self._counts.items()}

  def comparisons(self, model: str | None = None) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(model, primary version, shadow version) -> its comparison report, for one model or all."""
    with self._lock:
      items = [(k, c) for k, c in self._comparisons.items() if model is None or k[0] == model]
    return {k: c.report() for k, c in sorted(items)}


def _scores(out: Any, rows: int, output: str) -> np.ndarray:
  """One score per row of output `output`, or a ServingError saying why not."""
  a = np.asarray(out)
  if a.shape[:1] != (rows,) or a.size != rows:
    raise ServingError(Code.INVALID_ARGUMENT, f"shadow.output {output!r} has shape {a.shape}:"
                       f" comparing needs one score per row ({rows} rows)")
  return a.reshape(rows).astype(np.float64)
