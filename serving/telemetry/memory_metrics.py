"""`xlaserve_model_memory_bytes{model,version,kind,device}`: what each loaded version holds, by
kind ("params", "executable", "scratch" per device id; "host" with device "host"), read at
scrape time from each engine's `memory()` report (computed once at load)."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily

from serving.engines.memory import breakdown, runner_memory


class ModelMemoryCollector:
  """Collects from `runners()`: (label "<model>/<version>", runner) pairs; versions whose engine
  cannot tell what it holds are left out (absent, not zero)."""

  def __init__(self, runners: Callable[[], Iterable[tuple[str, Any]]]):
    self._runners = runners

  def collect(self) -> Iterator[Any]:
    fam = GaugeMetricFamily("xlaserve_model_memory_bytes", "Bytes a loaded model version holds:"
                            " params, executable (generated code) and scratch (largest"
                            " temporaries of one batch) per device, host-side bytes as"
                            " device=\"host\"", labels=["model", "version", "kind", "device"])
    for label, runner in self._runners():
      report = runner_memory(runner)
      if not report.known:
        continue
      model, _, version = label.partition("/")
      for kind, per_device in breakdown(report).items():
        for device, n in per_device.items():
          fam.add_metric([model, version, kind, device], float(n))
    yield fam
