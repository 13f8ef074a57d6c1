"""Prometheus view of every embedding cache (serving/engines/cached): per table, lookups, hits,
rows and bytes moved host to device, occupancy, admissions, evictions and live updates.

Read at scrape time from each engine's `table_stats()`, so a batch pays nothing extra. Rates
(misses/s, host->device bytes/s, hit rate over a window) are PromQL `rate()` of the counters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_COUNTERS = (  # stats key, metric name, help
    ("lookups", "xlaserve_embedding_lookups", "Ids looked up in a cached table (missing ids not"
     " counted)"),
    ("hits", "xlaserve_embedding_cache_hits", "Lookups answered from the device cache"),
    ("misses", "xlaserve_embedding_cache_misses", "Distinct rows gathered from the host table"
     " (one per missed row per batch)"),
    ("miss_bytes", "xlaserve_embedding_host_to_device_bytes", "Bytes of missed rows moved from"
     " the host table to the device"),
    ("inserts", "xlaserve_embedding_cache_inserts", "Rows admitted into the device cache"),
    ("evictions", "xlaserve_embedding_cache_evictions", "Cached rows replaced by hotter ones"),
    ("invalidations", "xlaserve_embedding_cache_invalidations", "Cached rows dropped because a"
     " live update changed them"),
    ("updated_rows", "xlaserve_embedding_updated_rows", "Table rows set by live updates"),
)


class EmbeddingCacheCollector:
  """Collects from `runners()`: (label "<model>/<version>", runner) pairs; runners whose engine
  has no `table_stats` (no embedding cache) are skipped."""

  def __init__(self, runners: Callable[[], Iterable[tuple[str, Any]]]):
    self._runners = runners

  def collect(self) -> Iterator[Any]:
    labels = ["model", "version", "table"]
    counters = {k: CounterMetricFamily(name, doc, labels=labels) for k, name, doc in _COUNTERS}
    gauges = {
        "occupancy": GaugeMetricFamily("xlaserve_embedding_cache_occupancy_rows",
                                       "Rows held in the device cache", labels=labels),
        "cache_rows": GaugeMetricFamily("xlaserve_embedding_cache_capacity_rows",
                                        "Rows the device cache holds at most", labels=labels),
        "hit_ratio": GaugeMetricFamily("xlaserve_embedding_cache_hit_ratio",
                                       "Hits / lookups since load", labels=labels),
    }
    placed = GaugeMetricFamily("xlaserve_embedding_table_device_bytes", "Device bytes a table"
                               " takes: the whole table, or its cache", labels=[*labels, "placement"])
    generation = GaugeMetricFamily("xlaserve_params_generation", "Live updates the model's"
                                   " params have taken", labels=["model", "version"])
    for label, runner in self._runners():
      stats = getattr(getattr(runner, "engine", None), "table_stats", None)
      if stats is None:
        continue
      model, _, version = label.partition("/")
      generation.add_metric([model, version], float(runner.engine.generation))
      for t in stats():
        key = [model, version, t["table"]]
        placed.add_metric([*key, t["placement"]], float(t["device_bytes"]))
        if t["placement"] != "cached":
          continue
        for k, fam in counters.items():
          fam.add_metric(key, float(t.get(k, 0)))
        gauges["occupancy"].add_metric(key, float(t["occupancy"]))
        gauges["cache_rows"].add_metric(key, float(t["cache_rows"]))
        gauges["hit_ratio"].add_metric(key, t["hits"] / t["lookups"] if t["lookups"] else 0.0)
    yield from counters.values()
    yield from gauges.values()
    yield placed
    yield generation
