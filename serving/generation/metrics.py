"""Prometheus view of every served generate model, under vLLM's metric names.

Read at scrape time from each GenerationService's `stats()`, so the engine loop pays
nothing per token. TTFT and TPOT are summaries (`_sum`, `_count`), as the service keeps them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

GAUGES = {
    "vllm:num_requests_running": ("running", "Sequences in decode slots"),
    "vllm:num_requests_waiting": ("waiting", "Sequences waiting for a slot or pages"),
    "vllm:gpu_cache_usage_perc": ("kv_cache_usage", "Fraction of KV-cache pages in use (0-1)"),
    "xlaserve:kv_cache_pages_used": ("kv_pages_used", "KV-cache pages in use"),
    "xlaserve:kv_cache_pages_total": ("kv_pages_total", "KV-cache pages in the pool"),
    "xlaserve:prefix_cache_pages": ("prefix_cache_pages",
                                    "KV-cache pages holding a cached prefix (shared or evictable)"),
    "vllm:spec_decode_draft_acceptance_rate": (
        "spec_acceptance_rate", "Speculative decoding: accepted / proposed draft tokens (0-1)"),
}
COUNTERS = {
    "vllm:generation_tokens": ("tokens_generated", "Tokens generated"),
    "vllm:prompt_tokens": ("prefill_tokens", "Prompt tokens prefilled"),
    "vllm:num_preemptions": ("preemptions", "Sequences preempted when pages ran out"),
    "xlaserve:generation_requests_refused": ("requests_refused", "Requests refused at admission"),
    "xlaserve:generation_requests_cancelled": ("requests_cancelled", "Requests cancelled"),
    "vllm:prefix_cache_queries": ("prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache"),
    "vllm:prefix_cache_hits": ("prefix_cache_hits",
                               "Prompt tokens found in the prefix cache (prefill skipped)"),
    "vllm:spec_decode_num_draft_tokens": ("spec_draft_tokens",
                                          "Speculative decoding: draft tokens proposed"),
    "vllm:spec_decode_num_accepted_tokens": ("spec_accepted_tokens",
                                             "Speculative decoding: draft tokens accepted"),
}
SUMMARIES = {
    "vllm:time_to_first_token_seconds": ("ttft_seconds_sum", "ttft_count",
                                         "Time to first token"),
    "vllm:time_per_output_token_seconds": ("tpot_seconds_sum", "tpot_count",
                                           "Time per output token after the first"),
}


class GenerationCollector:
  """Collects from `services()`: an iterable of (model name, GenerationService)."""

  def __init__(self, services: Callable[[], Iterable[tuple[str, Any]]]):
    self._services = services

  def collect(self) -> Iterator[Any]:
    stats = [(name, svc.stats()) for name, svc in self._services()]
    for metric, (key, doc) in GAUGES.items():
      fam = GaugeMetricFamily(metric, doc, labels=["model_name"])
      for name, st in stats:
        fam.add_metric([name], float(st.get(key, 0.0)))
      yield fam
    for metric, (key, doc) in COUNTERS.items():
      fam = CounterMetricFamily(metric, doc, labels=["model_name"])
      for name, st in stats:
        fam.add_metric([name], float(st.get(key, 0.0)))
      yield fam
    for metric, (sum_key, count_key, doc) in SUMMARIES.items():
      fam = SummaryMetricFamily(metric, doc, labels=["model_name"])
      for name, st in stats:
        fam.add_metric([name], count_value=float(st.get(count_key, 0)),
                       sum_value=float(st.get(sum_key, 0.0)))
      yield fam
