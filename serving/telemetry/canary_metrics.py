"""Prometheus series of canary splits and shadow comparisons, read from a snapshot at scrape time.

  xlaserve_traffic_requests_total{model,version}     unversioned requests the split sent there
  xlaserve_shadow_{submitted,dropped,failed}_total{model,shadow_version}
  xlaserve_shadow_inflight{model,shadow_version}
  xlaserve_shadow_* gauges{model,version,shadow_version}: the comparison of the served `version`
    with the shadow on the same rows (serving/telemetry/shadow_compare.py)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import Metric

_COUNTS = (("submitted", "Live requests also sent to the shadow version"),
           ("dropped", "Shadow requests dropped: too many in flight, or the shadow's queue full"),
           ("failed", "Shadow requests that failed or could not be compared (never surfaced)"))
_GAUGES = (("rows", "Rows scored by both versions"),
           ("requests", "Requests scored by both versions"),
           ("mean_shift", "Mean shadow score minus mean served score"),
           ("calibration_ratio", "Mean shadow score / mean served score (relative calibration:"
            " no labels)"),
           ("rank_correlation", "Spearman rank correlation of per-row scores (reservoir)"),
           ("top_changed_share", "Share of multi-row requests whose top-scored row changes"))


class CanaryCollector:
  """Renders `snapshot()` (serving/frontend/canary.py `Canary.snapshot`) at each scrape."""

  def __init__(self, snapshot: Callable[[], dict[str, Any]]):
    self._snapshot = snapshot

  def collect(self) -> Iterator[Metric]:
    snap = self._snapshot()
    m = Metric("xlaserve_traffic_requests", "Unversioned requests a traffic split sent to each"
               " version", "counter")
    for (model, version), n in sorted(snap["routed"].items()):
      m.add_sample("xlaserve_traffic_requests_total", {"model": model, "version": str(version)},
                   float(n))
    yield m
    for i, (name, doc) in enumerate(_COUNTS):
      m = Metric(f"xlaserve_shadow_{name}", doc, "counter")
      for (model, version), counts in sorted(snap["shadow"].items()):
        m.add_sample(f"xlaserve_shadow_{name}_total",
                     {"model": model, "shadow_version": str(version)}, float(counts[i]))
      yield m
    m = Metric("xlaserve_shadow_inflight", "Shadow requests in flight", "gauge")
    for (model, version), counts in sorted(snap["shadow"].items()):
      m.add_sample("xlaserve_shadow_inflight", {"model": model, "shadow_version": str(version)},
                   float(counts[3]))
    yield m
    yield from _comparison_metrics(snap["comparisons"])


def _comparison_metrics(comparisons: dict[tuple[str, int, int], dict]) -> Iterator[Metric]:
  """The xlaserve_shadow_* gauges of every (model, served version, shadow version)."""
  keys = {"rank_correlation": "spearman"}
  for name, doc in _GAUGES:
    m = Metric(f"xlaserve_shadow_{name}", doc, "gauge")
    for (model, primary, shadow), r in comparisons.items():
      value = r.get(keys.get(name, name))
      if value is not None:
        m.add_sample(f"xlaserve_shadow_{name}", _labels(model, primary, shadow), float(value))
    yield m
  mean = Metric("xlaserve_shadow_mean", "Mean score per side (served: primary; candidate:"
                " shadow)", "gauge")
  quant = Metric("xlaserve_shadow_quantile", "Score quantiles per side (reservoir)", "gauge")
  shift = Metric("xlaserve_shadow_quantile_shift", "Shadow minus served score quantile", "gauge")
  for (model, primary, shadow), r in comparisons.items():
    labels = _labels(model, primary, shadow)
    for side in ("primary", "shadow"):
      if r.get(f"mean_{side}") is not None:
        mean.add_sample("xlaserve_shadow_mean", labels | {"side": side}, r[f"mean_{side}"])
    for q, v in r.get("quantiles", {}).items():
      level = str(int(q[1:]) / 100)
      for side in ("primary", "shadow"):
        quant.add_sample("xlaserve_shadow_quantile", labels | {"side": side, "quantile": level},
                         v[side])
      shift.add_sample("xlaserve_shadow_quantile_shift", labels | {"quantile": level},
                       v["shift"])
  yield from (mean, quant, shift)


def _labels(model: str, primary: int, shadow: int) -> dict[str, str]:
  return {"model": model, "version": str(primary), "shadow_version": str(shadow)}
