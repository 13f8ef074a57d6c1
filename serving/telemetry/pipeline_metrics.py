"""Prometheus view of every served pipeline: per step, answers, failures and seconds spent, and
where tensors passed from one model step to the next (device or host).

Read at scrape time from each pipeline runner's `step_stats`, so a request pays nothing extra.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily


class PipelineCollector:
  """Collects from `runners()`: an iterable of ("<model>/<version>", pipeline runner)."""

  def __init__(self, runners: Callable[[], Iterable[tuple[str, Any]]]):
    self._runners = runners

  def collect(self) -> Iterator[Any]:
    seconds = SummaryMetricFamily(
        "xlaserve_pipeline_step_seconds", "Seconds per pipeline step (model steps: submit to"
        " answer, queueing included; op steps: run time)", labels=["model", "version", "step"])
    failures = CounterMetricFamily("xlaserve_pipeline_step_failures",
                                   "Pipeline requests failed at this step",
                                   labels=["model", "version", "step"])
    handoffs = CounterMetricFamily(
        "xlaserve_pipeline_handoffs", "Tensors handed from a model step to a later step's input,"
        " by where the hand-off happened (device: no host copy)",
        labels=["model", "version", "step", "input", "where"])
    for label, runner in self._runners():
      model, _, version = label.partition("/")
      for step, st in runner.step_stats.items():
        seconds.add_metric([model, version, step], count_value=float(st.count),
                           sum_value=st.ns / 1e9)
        failures.add_metric([model, version, step], float(st.fail))
      for (step, name, where), n in runner.handoff_counts.items():
        handoffs.add_metric([model, version, step, name, where], float(n))
    yield seconds
    yield failures
    yield handoffs
