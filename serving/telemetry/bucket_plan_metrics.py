"""Prometheus series of `bucket_plan: auto` (serving/repository/replan.py), read from the
planner's snapshot at scrape time.

  xlaserve_bucket_plan_adoptions_total{model}          plans adopted (each a switch of buckets)
  xlaserve_bucket_plan_waste{model,version}            padded/real rows - 1 of the served buckets
  xlaserve_bucket_plan_best_waste{model,version}       the same for the best plan
  xlaserve_bucket_plan_gain{model,version}             share of the batch cost the best plan saves
  (the last three on the traffic of the last plan, and the served buckets' figure is the
  adopted plan's once one is adopted)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import Metric

_GAUGES = (("waste", "Padded / real rows, less one, of the served batch buckets on the traffic"
            " recorded for the last bucket plan"),
           ("best_waste", "Padded / real rows, less one, of the best bucket plan on that traffic"),
           ("gain", "Share of the expected batch cost the best bucket plan saves over the served"
            " buckets on that traffic"))


class BucketPlanCollector:
  """Renders `snapshot()` (AutoPlanner.snapshot) at each scrape."""

  def __init__(self, snapshot: Callable[[], dict[str, Any]]):
    self._snapshot = snapshot

  def collect(self) -> Iterator[Metric]:
    snap = self._snapshot()
    m = Metric("xlaserve_bucket_plan_adoptions", "Bucket plans adopted (bucket_plan: auto)",
               "counter")
    for model, n in sorted(snap["adoptions"].items()):
      m.add_sample("xlaserve_bucket_plan_adoptions_total", {"model": model}, float(n))
    yield m
    for key, doc in _GAUGES:
      g = Metric(f"xlaserve_bucket_plan_{key}", doc, "gauge")
      for (model, version), figures in sorted(snap["plans"].items()):
        g.add_sample(f"xlaserve_bucket_plan_{key}", {"model": model, "version": str(version)},
                     float(figures[key]))
      yield g
