"""A batch's request latencies added at once give the same Prometheus exposition as adding them
one by one with prometheus_client's own `observe` (the independent reference)."""

import numpy as np
import prometheus_client as prom

from serving.telemetry.metrics import Metrics
from serving.types import Code


def _latency_lines(text: str) -> list[str]:
  return sorted(line for line in text.splitlines()
                if line.startswith(("xlaserve_request_latency_seconds", "nv_inference_request"))
                and not line.startswith("#"))


def test_bulk_observation_matches_one_by_one():
  rng = np.random.default_rng(0)
  values = np.concatenate([rng.exponential(0.004, 500), [0.0, 1e-5, 0.005, 0.1, 30.0]])
  bulk, single = Metrics(), Metrics()
  ob, os_ = bulk.observer("m", 1), single.observer("m", 1)
  ob.requests_done(ok_s=list(values), failed=[(Code.DEADLINE_EXCEEDED, 0.2)])
  # Batches of every size, small ones (a Python loop) and large (numpy) alike, bounds included.
  start = 0
  for size in [1, 2, 3, 5, 8, 13, 21, 32, 33, 64] * 3:
    chunk = np.concatenate([values[start:start + size], [0.001, 0.002]])[:size]
    ob.requests_done(ok_s=list(chunk) if size % 2 else chunk)  # lists and numpy arrays
    for v in chunk:
      os_.request_done(ok=True, duration_s=float(v), code=None)
    start = (start + size) % (len(values) - 64)
  for v in values:
    os_.request_done(ok=True, duration_s=float(v), code=None)
  os_.request_done(ok=False, duration_s=0.2, code=Code.DEADLINE_EXCEEDED)
  a = _latency_lines(prom.generate_latest(bulk.registry).decode())
  b = _latency_lines(prom.generate_latest(single.registry).decode())
  assert a and len(a) == len(b)
  for la, lb in zip(a, b):  # sums may differ in the last bits (summation order)
    name_a, va = la.rsplit(" ", 1)
    name_b, vb = lb.rsplit(" ", 1)
    assert name_a == name_b and np.isclose(float(va), float(vb), rtol=1e-9), (la, lb)


def _batch_lines(text: str) -> list[str]:
  prefixes = ("xlaserve_batch_rows", "xlaserve_batch_padding_fraction",
              "xlaserve_compute_duration_seconds", "xlaserve_queue_duration_seconds",
              "nv_inference_count", "nv_inference_exec_count", "nv_inference_compute_infer",
              "nv_inference_queue_duration")
  return sorted(line for line in text.splitlines() if line.startswith(prefixes))


def test_many_batches_at_once_match_one_batch_at_a_time():
  """`batches` (a native queue's batches, taken now and then) exports what one `batch` call
  per batch does: histograms by bucket, counters and sums."""
  rng = np.random.default_rng(1)
  buckets = rng.choice([1, 8, 64, 1024], 300)
  rows = np.maximum(1, (buckets * rng.random(300)).astype(int))
  compute = rng.exponential(0.002, 300)
  queue = [rng.exponential(0.001, int(rng.integers(0, 6))) for _ in range(300)]
  bulk, single = Metrics(), Metrics()
  ob, os_ = bulk.observer("m", 1), single.observer("m", 1)
  for lo, hi in [(0, 1), (1, 40), (40, 300)]:  # one batch, a few, many
    ob.batches(buckets=buckets[lo:hi].tolist(), rows=rows[lo:hi].tolist(),
               compute_s=list(compute[lo:hi]), queue_s=list(np.concatenate(queue[lo:hi])))
  for b, n, c, q in zip(buckets, rows, compute, queue):
    os_.batch(bucket=int(b), rows=int(n), queue_s=list(q), compute_s=float(c))
  a = _batch_lines(prom.generate_latest(bulk.registry).decode())
  b = _batch_lines(prom.generate_latest(single.registry).decode())
  assert len(a) > 40 and len(a) == len(b)
  for la, lb in zip(a, b):  # sums may differ in the last bits (summation order)
    name_a, va = la.rsplit(" ", 1)
    name_b, vb = lb.rsplit(" ", 1)
    assert name_a == name_b and np.isclose(float(va), float(vb), rtol=1e-9), (la, lb)
