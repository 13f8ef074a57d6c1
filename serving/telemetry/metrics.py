"""Prometheus metrics with Triton's names where one exists, plus batching and compile figures.

Each server owns its own CollectorRegistry (no process-global state), served as
Prometheus text over HTTP on the metrics port.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from serving.runners import Observer
from serving.telemetry.gpu_metrics import GpuCollector
from serving.telemetry.host_metrics import HostCollector
from serving.telemetry.profile import StageRecorder, model_key
from serving.telemetry.tracing import Tracing
from serving.types import Code

logger = logging.getLogger(__name__)

# Stage durations (queue, compute) reach below the request latency's first bucket.
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5,
                  1.0, 2.0, 5.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Request sizes, fine enough to plan buckets from: every size to 16, then quarter octaves.
_SIZE_BUCKETS = tuple(sorted({*range(1, 17), *(round(2 ** (k / 4)) for k in range(17, 65))}))


_TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (rows; does not count padding)",
    "nv_inference_exec_count": "Number of model executions performed (batches)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
}


class TritonCounters:
  """Counters under Triton's exact series names (prometheus_client would append `_total`)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._values: dict[str, dict[tuple, float]] = collections.defaultdict(dict)

  def inc(self, name: str, labels: tuple[tuple[str, str], ...], value: float = 1.0) -> None:
    with self._lock:
      series = self._values[name]
      key = tuple(sorted(labels))
      series[key] = series.get(key, 0.0) + value

  def value(self, name: str, **labels: str) -> float:
    with self._lock:
      return self._values[name].get(tuple(sorted(labels.items())), 0.0)

  def collect(self) -> Iterator[Metric]:
    with self._lock:
      snapshot = {k: dict(v) for k, v in self._values.items()}
    for name, doc in _TRITON_COUNTERS.items():
      m = Metric(name, doc, "counter")
      for labels, v in snapshot.get(name, {}).items():
        m.add_sample(name, dict(labels), v)
      yield m


class Metrics:
  """All series of one server; `observer(model, version)` binds them for a runner."""

  def __init__(self, compile_count: Callable[[], int] | None = None,
               tracing: Tracing | None = None):
    self.tracing = tracing  # batch spans of traced requests go through the observers
    r = self.registry = prom.CollectorRegistry()
    self.scrape_hooks = _ScrapeHooks()
    self.recorder: StageRecorder | None = None  # set while a profile capture runs
    r.register(self.scrape_hooks)  # first: it refreshes what the collectors below report
    mv = ["model", "version"]
    self.triton = TritonCounters()
    r.register(self.triton)
    r.register(HostCollector())  # nv_cpu_utilization, nv_cpu_memory_{total,used}_bytes
    r.register(GpuCollector())  # nv_gpu_* through NVML; absent without it
    self.pending = prom.Gauge("nv_inference_pending_request_count",
                              "Requests waiting in the queue", mv, registry=r)
    self.queue_rows = prom.Gauge("xlaserve_queue_rows", "Rows waiting in the queue", mv, registry=r)
    self.latency = prom.Histogram("xlaserve_request_latency_seconds", "End-to-end request latency",
                                  mv, buckets=_LATENCY_BUCKETS, registry=r)
    self.queue_time = prom.Histogram(
        "xlaserve_queue_duration_seconds", "Time each request waited in the queue before its"
        " batch was taken", mv, buckets=_STAGE_BUCKETS, registry=r)
    self.compute_time = prom.Histogram(
        "xlaserve_compute_duration_seconds", "Time each batch took from dispatch to its outputs",
        mv, buckets=_STAGE_BUCKETS, registry=r)
    self.batch_rows = prom.Histogram(
        "xlaserve_batch_rows", "Real rows per executed batch, by bucket", mv + ["bucket"],
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
    self.request_rows = prom.Histogram(
        "xlaserve_request_rows", "Rows per request (what `xlaserve plan-buckets` learns from)",
        mv, buckets=_SIZE_BUCKETS, registry=r)
    self.request_seq_len = prom.Histogram(
        "xlaserve_request_seq_len", "Sequence length per request of sequence models (what"
        " `xlaserve plan-buckets --sizes seq` learns from)", mv, buckets=_SIZE_BUCKETS, registry=r)
    self.padding = prom.Histogram(
        "xlaserve_batch_padding_fraction", "Padded rows / bucket rows per batch, by bucket",
        mv + ["bucket"], buckets=_FRACTION_BUCKETS, registry=r)
    self.shed = prom.Counter("xlaserve_requests_shed", "Requests refused at admission with"
                             " RESOURCE_EXHAUSTED (queue bound or unreachable deadline)", mv,
                             registry=r)
    self.deadline_miss = prom.Counter("xlaserve_deadline_exceeded",
                                      "Requests whose deadline passed while queued", mv, registry=r)
    if compile_count is not None:
      g = prom.Gauge("xlaserve_compiles_after_warmup",
                     "XLA compiles outside model warm-up (must stay 0)", registry=r)
      g.set_function(compile_count)

  def add_native_front_end(self, stats: Callable[[], Mapping[str, int]]) -> None:
    """Exports the native front ends' call counts, read at scrape time: `fast` (answered in
    C++), `relayed` (to the Python servicer), `forwarded` (handed back by the feeder), and
    HTTP's `http_fast`, `http_relayed`, `http_tunnels`, `http_timeouts`."""
    self.registry.register(_NativeCollector(stats))

  def observer(self, model: str, version: int) -> Observer:
    return _ModelObserver(self, model, str(version))

  def flush(self) -> None:
    """Brings every model's metrics up to date, as a scrape does first (runners that keep
    theirs in a native queue hand them over now)."""
    self.scrape_hooks.collect()

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)


class _ScrapeHooks:
  """Runs the registered refreshes (weakly held bound methods) at the start of each scrape;
  yields no metrics itself."""

  def __init__(self) -> None:
    self._hooks: list[tuple[weakref.WeakMethod, dict]] = []
    self._lock = threading.Lock()

  def add(self, method: Callable[..., None], kwargs: dict) -> None:
    with self._lock:
      self._hooks = [h for h in self._hooks if h[0]() is not None]
      self._hooks.append((weakref.WeakMethod(method), kwargs))

  def collect(self) -> Iterator[Metric]:
    with self._lock:
      hooks = list(self._hooks)
    for ref, kwargs in hooks:
      method = ref()
      if method is not None:
        try:
          method(**kwargs)
        except Exception:  # a scrape must not fail for one model
          pass
    return iter(())


_NATIVE_PATHS = frozenset({"fast", "relayed", "forwarded", "http_fast", "http_relayed",
                           "http_tunnels", "http_timeouts"})


class _NativeCollector:
  """`xlaserve_native_calls{path=...}`: cumulative calls by the path they took;
  `xlaserve_native_unread_calls`, the accept backlog in use (Frontend::SetAcceptBacklog); and
  the gRPC read coalescing under a latency target (native/cq_poll.cc)."""

  def __init__(self, stats: Callable[[], Mapping[str, int]]):
    self._stats = stats

  def collect(self) -> Iterator[Metric]:
    m = Metric("xlaserve_native_calls", "Calls the native front ends took, by path: gRPC fast"
               " (answered in C++), relayed (to the Python servicer), forwarded (handed back);"
               " HTTP http_fast (answered in C++), http_relayed (to the Python HTTP server),"
               " http_tunnels (connections passed through whole), http_timeouts (408)",
               "counter")
    stats = self._stats()
    for path, v in sorted(stats.items()):
      if path in _NATIVE_PATHS:
        m.add_sample("xlaserve_native_calls_total", {"path": path}, float(v))
    yield m
    if "unread" in stats:
      yield GaugeMetricFamily(
          "xlaserve_native_unread_calls", "ModelInfer calls the native gRPC front end accepted"
          " whose message is not yet read; at --native-accept-backlog, further calls wait"
          " inside gRPC", value=float(stats["unread"]))
    if "coalesce_us" in stats:
      yield GaugeMetricFamily(
          "xlaserve_native_read_coalesce_seconds", "The pause the native gRPC front end takes"
          " instead of blocking when calls arrive fast enough, so arrivals are read together:"
          " 2% of the tightest model latency target, at most 500 us; 0 without a target",
          value=stats["coalesce_us"] / 1e6)
      yield CounterMetricFamily(
          "xlaserve_native_read_coalesce_pauses", "Pauses the native gRPC front end took to"
          " read arrivals together (xlaserve_native_read_coalesce_seconds each)",
          value=float(stats["coalesce_pauses"]))


class _ModelObserver(Observer):
  def __init__(self, m: Metrics, model: str, version: str):
    self.m, self.labels = m, (model, version)
    self._tl = (("model", model), ("version", version))
    self._inc = m.triton.inc
    self._latency = m.latency.labels(*self.labels)
    self._pending = m.pending.labels(*self.labels)
    self._queue_rows = m.queue_rows.labels(*self.labels)
    self._request_rows = m.request_rows.labels(*self.labels)
    self._request_seq_len = m.request_seq_len.labels(*self.labels)
    self._queue_time = m.queue_time.labels(*self.labels)
    self._compute_time = m.compute_time.labels(*self.labels)
    self._per_bucket: dict[int, tuple] = {}
    self._key = model_key(model, version)
    self._tracing = m.tracing
    self.tracing = m.tracing is not None

  def batch(self, *, bucket: int, rows: int, queue_s: Sequence[float], compute_s: float) -> None:
    hist = self._bucket_hists(bucket)
    hist[0].observe(rows)
    hist[1].observe((bucket - rows) / bucket)
    self._inc("nv_inference_exec_count", self._tl)
    self._inc("nv_inference_count", self._tl, rows)
    self._inc("nv_inference_compute_infer_duration_us", self._tl, compute_s * 1e6)
    self._compute_time.observe(compute_s)
    self._queued(queue_s)

  def batches(self, *, buckets: Sequence[int], rows: Sequence[int], compute_s: Sequence[float],
              queue_s: Sequence[float]) -> None:
    """What `batch` records for each of many batches, one increment per histogram bucket."""
    b, n = np.asarray(buckets, np.int64), np.asarray(rows, np.int64)
    for bucket in np.unique(b).tolist():
      hist = self._bucket_hists(bucket)
      mine = n[b == bucket]
      _observe_many(hist[0], mine.tolist())
      _observe_many(hist[1], ((bucket - mine) / bucket).tolist())
    self._inc("nv_inference_exec_count", self._tl, len(b))
    self._inc("nv_inference_count", self._tl, int(n.sum()))
    self._inc("nv_inference_compute_infer_duration_us", self._tl, _total(compute_s) * 1e6)
    _observe_many(self._compute_time, compute_s)
    self._queued(queue_s)

  def _bucket_hists(self, bucket: int) -> tuple:
    """The batch-rows and padding histograms of one bucket."""
    hist = self._per_bucket.get(bucket)
    if hist is None:
      hist = self._per_bucket[bucket] = (self.m.batch_rows.labels(*self.labels, str(bucket)),
                                         self.m.padding.labels(*self.labels, str(bucket)))
    return hist

  def _queued(self, queue_s: Sequence[float]) -> None:
    """Requests' queue waits: the Triton counter, the histogram, a running profile."""
    if len(queue_s):
      self._inc("nv_inference_queue_duration_us", self._tl, _total(queue_s) * 1e6)
      _observe_many(self._queue_time, queue_s)
    if (recorder := self.m.recorder) is not None:  # compute: with the batch (batch_timing)
      recorder.add(self._key, "queue", queue_s)

  def batch_timing(self, *, start: float, done: float, rows: int, requests: int,
                   assembly_s: float, encode_s: float) -> None:
    if (recorder := self.m.recorder) is not None:
      recorder.batch(self._key, start=start, done=done, rows=rows, requests=requests,
                     assembly_s=assembly_s, encode_s=encode_s)

  def traced_batch(self, *, bucket: int, rows: int, requests: Sequence[Any], t_taken: float,
                   t_dispatch: float, t_done: float, natives: Sequence[tuple] = (),
                   t_sent: float = 0.0) -> None:
    try:  # a tracing fault must not stop the runner thread that calls this
      self._tracing.batch(model=self.labels[0], version=self.labels[1], bucket=bucket, rows=rows,
                          traces=[r.trace for r in requests], t_taken=t_taken,
                          t_dispatch=t_dispatch, t_done=t_done, natives=natives, t_sent=t_sent)
    except Exception:
      logger.exception("recording a batch span failed")

  def request_done(self, *, ok: bool, duration_s: float, code: Code | None) -> None:
    self._inc("nv_inference_request_duration_us", self._tl, duration_s * 1e6)
    if ok:
      self._inc("nv_inference_request_success", self._tl)
      self._latency.observe(duration_s)
    else:
      reason = code.value if code else "INTERNAL"
      self._inc("nv_inference_request_failure", self._tl + (("reason", reason),))
      if code is Code.DEADLINE_EXCEEDED:
        self.m.deadline_miss.labels(*self.labels).inc()

  def requests_done(self, *, ok_s: Sequence[float],
                    failed: Sequence[tuple[Code, float]] = ()) -> None:
    """A batch's requests at once: counters by their sums, the latency histogram by one
    bucket count per bucket (no per-request Python on the native path's hot loop)."""
    if len(ok_s):
      self._inc("nv_inference_request_duration_us", self._tl, _total(ok_s) * 1e6)
      self._inc("nv_inference_request_success", self._tl, len(ok_s))
      _observe_many(self._latency, ok_s)
    for code, d in failed:
      self.request_done(ok=False, duration_s=d, code=code)

  def request_sizes(self, rows: Sequence[int]) -> None:
    if len(rows):
      _observe_many(self._request_rows, rows)

  def request_lengths(self, lengths: Sequence[int]) -> None:
    if len(lengths):
      _observe_many(self._request_seq_len, lengths)

  def queue_depth(self, rows: int, requests: int) -> None:
    self._queue_rows.set(rows)
    self._pending.set(requests)

  def on_scrape(self, refresh: Callable[..., None], **kwargs: Any) -> None:
    self.m.scrape_hooks.add(refresh, kwargs)

  def shed(self, n: int = 1) -> None:
    self.m.shed.labels(*self.labels).inc(n)
    self._inc("nv_inference_request_failure",
              self._tl + (("reason", Code.RESOURCE_EXHAUSTED.value),), n)  # Triton counts them


def _total(values: Sequence[float]) -> float:
  """The sum of a batch's values: the builtin for a list (np.sum first converts it: 3 us
  against 0.1 us for 15 values), numpy's for an array."""
  return float(values.sum()) if isinstance(values, np.ndarray) else float(sum(values))


def _observe_many(hist: Any, values: Sequence[float]) -> None:
  """Adds many observations to a prometheus_client histogram child: one increment per bucket
  (its per-bucket counters and sum, as `observe` keeps them); one `observe` each if that
  layout is not there."""
  bounds, buckets, total = (getattr(hist, "_upper_bounds", None), getattr(hist, "_buckets", None),
                            getattr(hist, "_sum", None))
  if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
    for v in values:
      hist.observe(v)
    return
  if len(values) <= 32:  # a batch's worth: a Python loop beats numpy's per-call overhead
    values = values.tolist() if isinstance(values, np.ndarray) else values
    upper = hist._upper_bounds
    where = [bisect.bisect_left(upper, v) for v in values]  # the first bound >= v, as `observe`
    for i in set(where):  # a batch's values share few buckets: one (locked) increment each
      buckets[i].inc(where.count(i))
    total.inc(_total(values))
    return
  arr = np.asarray(values, dtype=np.float64)
  counts = np.bincount(np.searchsorted(np.asarray(bounds), arr, side="left"),
                       minlength=len(bounds))
  total.inc(float(arr.sum()))
  for i in np.flatnonzero(counts):
    buckets[i].inc(int(counts[i]))

