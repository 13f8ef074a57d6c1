"""A bug in the Python row runner's own code (a batching decision, or the metrics around a batch)
must not stop the model: the requests it touched are answered INTERNAL exactly once, the others
as usual, and the next request is served (checked against the MockEngine's hand-worked outputs).
Faults are injected through public seams: the Batcher class's `decide`, and the Observer a
runner is built with."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher, BatchingConfig
from serving.engines.mock import MockEngine
from serving.runners import ModelRunner
from serving.runners.base import Observer
from serving.types import CallbackSink, Code, InferRequest
from servingutil import expected, mock_rows


class _Answers:
  """Every answer each request got, by request number."""

  def __init__(self) -> None:
    self.got: dict[int, list] = {}
    self.inputs: dict[int, tuple] = {}
    self.cv = threading.Condition()

  def request(self, n: int, rows: int = 1) -> InferRequest:
    x, k = mock_rows(np.random.default_rng(n), rows)
    self.inputs[n] = (x, k)

    def on_done(out, err):
      with self.cv:
        self.got.setdefault(n, []).append((out, err))
        self.cv.notify_all()

    return InferRequest({"x": x, "k": k}, rows, CallbackSink(), time.perf_counter(), sink_token=on_done)

  def wait(self, numbers, timeout: float = 10.0) -> None:
    with self.cv:
      assert self.cv.wait_for(lambda: all(n in self.got for n in numbers), timeout), (
          f"unanswered: {sorted(set(numbers) - set(self.got))}")

  def served(self, n: int) -> None:
    """Request n was answered once, with the MockEngine's outputs worked by hand."""
    (out, err), = self.got[n]
    assert err is None, err
    y, z = expected(*self.inputs[n])
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["z"], z)

  def then_served(self, runner, numbers) -> None:
    """The runner serves new requests `numbers` (n rows each) exactly."""
    for n in numbers:
      runner.submit(self.request(n, rows=n))
    self.wait(numbers)
    for n in numbers:
      self.served(n)

  def failed(self, n: int, text: str) -> None:
    (out, err), = self.got[n]
    assert out is None and err.code is Code.INTERNAL and text in err.message, err


def _runner(**kw) -> ModelRunner:
  eng = MockEngine(buckets=(1, 2, 4, 8))
  return ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=1, **kw)


@pytest.mark.parametrize("how", ["raises", "takes_the_queue_then_raises"])
def test_a_batching_decision_that_raises_fails_what_was_queued_and_the_model_keeps_serving(
    monkeypatch, how):
  real, calls = Batcher.decide, []

  def faulty(self, now, *, idle):
    calls.append(now)
    if len(calls) == 1:
      if how == "takes_the_queue_then_raises":
        self.drain()  # the requests leave the queue and the decision never returns them
      raise RuntimeError("injected decision bug")
    return real(self, now, idle=idle)

  monkeypatch.setattr(Batcher, "decide", faulty)
  answers, runner = _Answers(), _runner()
  for n in range(3):
    runner.submit(answers.request(n, rows=n + 1))  # queued before the worker starts
  runner.start()
  try:
    answers.wait(range(3))
    for n in range(3):
      answers.failed(n, "batching failed (injected decision bug)")
    answers.then_served(runner, [3])
  finally:
    runner.stop()
  assert runner.pending_requests == 0


class _FailingObserver(Observer):
  """Metrics that raise once, at `where`: when the first batch's statistics are recorded
  (after its answers are ready), or when its requests start (before it runs)."""

  def __init__(self, where: str) -> None:
    super().__init__()
    self.where, self.raised = where, False

  def _maybe_raise(self, where: str) -> None:
    if where == self.where and not self.raised:
      self.raised = True
      raise RuntimeError("injected metrics bug")

  def batch(self, **kw) -> None:
    self._maybe_raise("batch")

  def request_sizes(self, rows) -> None:
    self._maybe_raise("start")


@pytest.mark.parametrize("where", ["batch", "start"])
def test_a_metrics_failure_leaves_the_model_serving(where):
  """A failure recording a finished batch's metrics does not fail its answers; one when its
  requests start fails that batch (INTERNAL) only."""
  answers, runner = _Answers(), _runner(observer=_FailingObserver(where))
  for n in range(2):
    runner.submit(answers.request(n, rows=2))  # one batch of 4 rows
  runner.start()
  try:
    answers.wait(range(2))
    for n in range(2):
      if where == "batch":
        answers.served(n)
      else:
        answers.failed(n, "failed to start a batch: injected metrics bug")
    answers.then_served(runner, [2, 3])
  finally:
    runner.stop()
  assert runner.pending_requests == 0
  assert runner.stats.success_count == (4 if where == "batch" else 2)


class _MalformedOnceEngine(MockEngine):
  """A model whose first batch comes back without its `z` output (a broken answer)."""

  def fetch(self, handle):
    out = super().fetch(handle)
    if len(self.batches) == 1:
      out = {k: v for k, v in out.items() if k != "z"}
    return out


def test_a_batch_that_cannot_be_answered_fails_its_requests_once_and_the_model_keeps_serving():
  eng = _MalformedOnceEngine(buckets=(1, 2, 4, 8))
  runner = ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=1)
  answers = _Answers()
  for n in range(2):
    runner.submit(answers.request(n, rows=2))
  runner.start()
  try:
    answers.wait(range(2))
    for n in range(2):
      (out, err), = answers.got[n]
      assert out is None and err.code is Code.INTERNAL, err
    answers.then_served(runner, [2])
  finally:
    runner.stop()
  assert runner.pending_requests == 0


class _FailingTimingObserver(_FailingObserver):
  def batch_timing(self, **kw) -> None:
    self._maybe_raise("timing")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("where", ["batch", "timing", "start"])
def test_the_native_queue_runner_survives_a_metrics_failure(where, depth):
  """The same on the native (C++) batch queue: its dispatch and completion threads live on.
  Its metrics are taken from the queue apart from any batch, so no failure there, not even
  the one when requests start, fails a request."""
  from serving.frontend.native import load_extension
  from serving.frontend.native_queue import row_queue_factory
  from serving.runners import QueuedRowRunner

  native, why = load_extension()
  if native is None:
    pytest.skip(why)
  eng = MockEngine(buckets=(1, 2, 4, 8))
  eng.warmup()
  runner = QueuedRowRunner("m/1", eng, BatchingConfig(buckets=eng.buckets),
                           queue_factory=row_queue_factory(native), instances=1, depth=depth,
                           observer=_FailingTimingObserver(where))
  answers = _Answers()
  runner.start()
  try:
    runner.submit(answers.request(0, rows=2))
    answers.wait([0])
    answers.served(0)
    answers.then_served(runner, [1, 2, 3])
  finally:
    runner.stop()
