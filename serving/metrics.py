"""Prometheus metrics with Triton's names where one exists, plus batching and compile figures.

Each server owns its own CollectorRegistry (no process-global state), served as
Prometheus text over HTTP on the metrics port.
"""

from __future__ import annotations

from typing import Callable, Sequence

import prometheus_client as prom

from serving.runner import Observer
from serving.types import Code

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class Metrics:
  """All series of one server; `observer(model, version)` binds them for a runner."""

  def __init__(self, compile_count: Callable[[], int] | None = None):
    r = self.registry = prom.CollectorRegistry()
    mv = ["model", "version"]
    self.success = prom.Counter("nv_inference_request_success", "Successful inference requests",
                                mv, registry=r)
    self.failure = prom.Counter("nv_inference_request_failure", "Failed inference requests",
                                mv + ["reason"], registry=r)
    self.count = prom.Counter("nv_inference_count", "Inferences performed (rows)", mv, registry=r)
    self.exec_count = prom.Counter("nv_inference_exec_count", "Batches executed", mv, registry=r)
    self.request_us = prom.Counter("nv_inference_request_duration_us",
                                   "Cumulative end-to-end request time (us)", mv, registry=r)
    self.queue_us = prom.Counter("nv_inference_queue_duration_us",
                                 "Cumulative time requests waited in the queue (us)", mv, registry=r)
    self.compute_us = prom.Counter("nv_inference_compute_infer_duration_us",
                                   "Cumulative batch compute time (us)", mv, registry=r)
    self.pending = prom.Gauge("nv_inference_pending_request_count",
                              "Requests queued or executing", mv, registry=r)
    self.queue_rows = prom.Gauge("xlaserve_queue_rows", "Rows waiting in the queue", mv, registry=r)
    self.latency = prom.Histogram("xlaserve_request_latency_seconds", "End-to-end request latency",
                                  mv, buckets=_LATENCY_BUCKETS, registry=r)
    self.batch_rows = prom.Histogram(
        "xlaserve_batch_rows", "Real rows per executed batch, by bucket", mv + ["bucket"],
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
    self.padding = prom.Histogram(
        "xlaserve_batch_padding_fraction", "Padded rows / bucket rows per batch, by bucket",
        mv + ["bucket"], buckets=_FRACTION_BUCKETS, registry=r)
    self.shed = prom.Counter("xlaserve_requests_shed", "Requests refused with RESOURCE_EXHAUSTED",
                             mv, registry=r)
    self.deadline_miss = prom.Counter("xlaserve_deadline_exceeded",
                                      "Requests whose deadline passed while queued", mv, registry=r)
    if compile_count is not None:
      g = prom.Gauge("xlaserve_compiles_after_warmup",
                     "XLA compiles outside model warm-up (must stay 0)", registry=r)
      g.set_function(compile_count)

  def observer(self, model: str, version: int) -> Observer:
    return _ModelObserver(self, model, str(version))

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)


class _ModelObserver(Observer):
  def __init__(self, m: Metrics, model: str, version: str):
    self.m, self.labels = m, (model, version)
    self._success = m.success.labels(*self.labels)
    self._count = m.count.labels(*self.labels)
    self._exec = m.exec_count.labels(*self.labels)
    self._req_us = m.request_us.labels(*self.labels)
    self._queue_us = m.queue_us.labels(*self.labels)
    self._compute_us = m.compute_us.labels(*self.labels)
    self._latency = m.latency.labels(*self.labels)
    self._pending = m.pending.labels(*self.labels)
    self._queue_rows = m.queue_rows.labels(*self.labels)
    self._per_bucket: dict[int, tuple] = {}

  def batch(self, *, bucket: int, rows: int, queue_s: Sequence[float], compute_s: float) -> None:
    hist = self._per_bucket.get(bucket)
    if hist is None:
      hist = self._per_bucket[bucket] = (self.m.batch_rows.labels(*self.labels, str(bucket)),
                                         self.m.padding.labels(*self.labels, str(bucket)))
    hist[0].observe(rows)
    hist[1].observe((bucket - rows) / bucket)
    self._exec.inc()
    self._count.inc(rows)
    self._compute_us.inc(compute_s * 1e6)
    if queue_s:
      self._queue_us.inc(sum(queue_s) * 1e6)

  def request_done(self, *, ok: bool, duration_s: float, code: Code | None) -> None:
    self._req_us.inc(duration_s * 1e6)
    if ok:
      self._success.inc()
      self._latency.observe(duration_s)
    else:
      reason = code.value if code else "INTERNAL"
      self.m.failure.labels(*self.labels, reason).inc()
      if code is Code.DEADLINE_EXCEEDED:
        self.m.deadline_miss.labels(*self.labels).inc()

  def queue_depth(self, rows: int, requests: int) -> None:
    self._queue_rows.set(rows)
    self._pending.set(requests)

  def shed(self) -> None:
    self.m.shed.labels(*self.labels).inc()
