"""The runner on a native (C++) batch queue, driven in-process with Python requests: answers
match the mock engine's hand-worked formula for every row (whole, padded, split and concurrent
requests), a poisoned batch fails only its poisoned request, deadlines expire in the queue,
refusals carry the queue's message, stop without drain answers every request, and the stats
add up. (The native front end's own requests: test_native_frontend.py and the server tests.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import BatchingConfig
from serving.engines.mock import MockEngine
from serving.frontend.native import load_extension
from serving.frontend.native_queue import row_queue_factory
from serving.runners import QueuedRowRunner
from serving.types import CallbackSink, Code, InferRequest

native, why = load_extension()
pytestmark = pytest.mark.skipif(native is None, reason=why)


def reference(x, k):
  """MockEngine's outputs by hand, in float32: y = 2 * sum(x) + 1, z = x * k."""
  return 2.0 * x.sum(axis=1, keepdims=True) + 1.0, x * k.astype(np.float32)


class Client:
  """Submits requests and collects each answer once (a second answer fails the test)."""

  def __init__(self, runner):
    self.runner, self.sink = runner, CallbackSink()
    self.answers: dict[str, tuple] = {}
    self.done = threading.Condition()

  def send(self, name, x, k, *, deadline_s=None, priority=0):
    now = time.perf_counter()

    def answer(out, err):
      with self.done:
        assert name not in self.answers, f"{name} answered twice"
        self.answers[name] = (out, err)
        self.done.notify_all()
    self.runner.submit(InferRequest({"x": x, "k": k}, len(x), self.sink, now,
                                    None if deadline_s is None else now + deadline_s, priority,
                                    name, sink_token=answer))

  def wait(self, n, timeout=20.0):
    with self.done:
      assert self.done.wait_for(lambda: len(self.answers) >= n, timeout), self.answers.keys()
    return self.answers


def make(eng, instances=1, depth=None, **cfg):
  eng.warmup()
  runner = QueuedRowRunner("m/1", eng, BatchingConfig(buckets=eng.buckets, **cfg),
                           queue_factory=row_queue_factory(native), instances=instances,
                           depth=depth)
  runner.start()
  return runner


def rows(rng, n):
  return rng.random((n, 4)).astype(np.float32), rng.integers(-3, 4, (n, 1)).astype(np.int32)


# Depth 1 completes each batch on the thread that dispatched it; depth 2 dispatches batch n+1
# while a completion thread waits for batch n.
DEPTHS = pytest.mark.parametrize("depth", [1, 2])


@DEPTHS
@pytest.mark.parametrize("instances", [1, 2])
def test_every_row_is_answered_like_the_reference(instances, depth):
  rng = np.random.default_rng(0)
  eng = MockEngine(buckets=(1, 2, 4, 8), delay_s=0.001)
  runner = make(eng, instances, depth)
  c = Client(runner)
  sent = {f"r{i}": rows(rng, n) for i, n in enumerate([1, 3, 8, 5, 19, 2, 30, 7, 1, 4] * 3)}
  threads = [threading.Thread(target=lambda items: [c.send(n, *xk) for n, xk in items],
                              args=(list(sent.items())[i::3],)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  answers = c.wait(len(sent))
  for name, (x, k) in sent.items():
    out, err = answers[name]
    assert err is None, err
    y, z = reference(x, k)
    np.testing.assert_allclose(out["y"], y, rtol=1e-6)
    np.testing.assert_array_equal(out["z"], z)
  runner.stop()
  st = runner.stats
  assert st.success_count == len(sent) and st.fail_count == 0
  assert st.inference_count == sum(len(x) for x, _ in sent.values())  # real rows, no padding
  assert sum(st.batch_counts.values()) == st.execution_count == len(eng.batches)
  assert set(eng.batches) <= {1, 2, 4, 8}


@DEPTHS
def test_a_poisoned_batch_fails_only_the_poisoned_request(depth):
  rng = np.random.default_rng(1)
  eng = MockEngine(buckets=(1, 2, 4, 8), delay_s=0.05, fail_value=-1.0)
  runner = make(eng, depth=depth, max_queue_delay_s=0.2, dispatch_when_idle=False)
  c = Client(runner)
  good = {f"g{i}": rows(rng, 2) for i in range(3)}
  bad_x, bad_k = rows(rng, 2)
  bad_x[1, 2] = -1.0
  for name, xk in good.items():
    c.send(name, *xk)
  c.send("bad", bad_x, bad_k)  # 8 rows: one batch with the three good requests
  answers = c.wait(4)
  assert answers["bad"][0] is None and answers["bad"][1].code is Code.INTERNAL
  for name, (x, k) in good.items():
    np.testing.assert_array_equal(answers[name][0]["z"], reference(x, k)[1])
  runner.stop()


@DEPTHS
def test_deadline_expires_in_the_queue_and_refusal_names_the_queue(depth):
  rng = np.random.default_rng(2)
  eng = MockEngine(buckets=(1, 2, 4, 8), delay_s=0.3)
  runner = make(eng, depth=depth, max_queue_rows=16)
  c = Client(runner)
  c.send("first", *rows(rng, 8))  # occupies the engine for 0.3 s
  time.sleep(0.05)
  c.send("late", *rows(rng, 2), deadline_s=0.05)
  c.send("filler", *rows(rng, 8))
  with pytest.raises(Exception) as refused:
    c.send("over", *rows(rng, 8))  # 10 rows queued + 8 > max_queue_rows=16
  assert refused.value.code is Code.RESOURCE_EXHAUSTED
  assert "model m/1: queue full: 10 rows queued" in refused.value.message
  answers = c.wait(3)
  assert answers["late"][1].code is Code.DEADLINE_EXCEEDED
  assert answers["first"][1] is None and answers["filler"][1] is None
  runner.stop()
  st = runner.stats
  assert (st.expired, st.rejected, st.success_count) == (1, 1, 2)


@DEPTHS
def test_stop_without_drain_answers_every_queued_request(depth):
  rng = np.random.default_rng(3)
  eng = MockEngine(buckets=(1, 2, 4, 8), delay_s=0.2)
  runner = make(eng, depth=depth)
  c = Client(runner)
  for i in range(4):
    c.send(f"r{i}", *rows(rng, 8))
  time.sleep(0.05)
  runner.stop(drain=False)
  answers = c.wait(4)
  codes = sorted((err.code.value if err else "OK") for _, err in answers.values())
  assert codes.count("OK") >= 1 and "UNAVAILABLE" in codes  # ran, or refused with a retry hint
  with pytest.raises(Exception) as late:
    c.send("after", *rows(rng, 1))
  assert late.value.code is Code.UNAVAILABLE and "shutting down" in late.value.message


def _samples(registry) -> dict[tuple[str, tuple], float]:
  """A scrape of `registry`, as {(sample name, sorted labels): value}."""
  import prometheus_client as prom
  from prometheus_client.parser import text_string_to_metric_families

  text = prom.generate_latest(registry).decode()
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for fam in text_string_to_metric_families(text) for s in fam.samples}


def _total(samples, name: str, **labels: str) -> float:
  """The sum of `name`'s samples whose labels include `labels`."""
  return sum(v for (n, ls), v in samples.items()
             if n == name and set(labels.items()) <= set(ls))


@pytest.mark.parametrize("instances", [1, 2])
def test_a_scrape_right_after_the_answers_counts_every_request_and_batch(instances):
  """The queue keeps each batch's metrics until they are taken (no metrics work per batch);
  a scrape takes them first, so it counts every request already answered: against the
  requests sent and the batches the engine ran."""
  from serving.telemetry.metrics import Metrics

  rng = np.random.default_rng(4)
  eng = MockEngine(buckets=(1, 2, 4, 8), delay_s=0.001)
  metrics = Metrics()
  eng.warmup()
  runner = QueuedRowRunner("m/1", eng, BatchingConfig(buckets=eng.buckets),
                           queue_factory=row_queue_factory(native), instances=instances,
                           observer=metrics.observer("m", 1))
  runner.start()
  c = Client(runner)
  sizes = [1, 3, 8, 5, 19, 2, 30, 7, 1, 4] * 2
  for i, n in enumerate(sizes):
    c.send(f"r{i}", *rows(rng, n))
  c.wait(len(sizes))
  got = _samples(metrics.registry)  # before stop: nothing else has taken the queue's metrics
  try:
    mine = {"model": "m", "version": "1"}
    assert _total(got, "nv_inference_request_success", **mine) == len(sizes)
    assert _total(got, "xlaserve_request_latency_seconds_count", **mine) == len(sizes)
    assert _total(got, "xlaserve_queue_duration_seconds_count", **mine) == len(sizes)
    assert _total(got, "xlaserve_request_rows_count", **mine) == len(sizes)
    assert _total(got, "xlaserve_request_rows_sum", **mine) == sum(sizes)
    assert _total(got, "nv_inference_count", **mine) == sum(sizes)  # real rows, no padding
    assert _total(got, "xlaserve_batch_rows_sum", **mine) == sum(sizes)
    assert _total(got, "nv_inference_exec_count", **mine) == len(eng.batches)
    assert _total(got, "xlaserve_compute_duration_seconds_count", **mine) == len(eng.batches)
    for bucket in set(eng.batches):
      assert _total(got, "xlaserve_batch_rows_count", bucket=str(bucket), **mine) == \
          eng.batches.count(bucket)
      assert _total(got, "xlaserve_batch_padding_fraction_count", bucket=str(bucket),
                    **mine) == eng.batches.count(bucket)
  finally:
    runner.stop()
