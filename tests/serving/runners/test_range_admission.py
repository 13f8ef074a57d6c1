"""A request holding a value a narrowed input cannot take (64-bit ids past 32 bits, which the
model would wrap into other rows) is refused at admission with the engine's own message, on the
native queue and the Python one: it never reaches a batch, so the requests it would have
shared one with run once each (before, its batch failed and every request in it re-ran alone,
and a few such requests a second cost the others most of the model's throughput)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bundle import TensorSpec
from serving.batching import BatchingConfig
from serving.engines.base import check_fits
from serving.engines.mock import MockEngine
from serving.frontend.native import load_extension
from serving.frontend.native_queue import row_queue_factory
from serving.runners import ModelRunner, QueuedRowRunner
from serving.types import CallbackSink, Code, InferRequest, ServingError

native, why = load_extension()


class NarrowedEngine(MockEngine):
  """MockEngine with a 64-bit integer `k` that the model runs as `kind` (int32 or uint32),
  checked at dispatch as the bundle engines check it, recording every row of `x` each dispatch
  was given (a batch refused at dispatch included)."""

  def __init__(self, kind: type):
    super().__init__(buckets=(1, 2, 4, 8), delay_s=0.002)
    wide = "int64" if kind is np.int32 else "uint64"
    self.inputs = (self.inputs[0], TensorSpec("k", wide, (-1, 1), ("batch", None)))
    self.kind, self.ran = kind, []

  @property
  def narrowed_inputs(self):
    return {"k": self.kind}

  def dispatch(self, *, bucket, inputs):
    self.ran.append(np.array(inputs["x"]))
    check_fits("k", inputs["k"], self.kind)
    return super().dispatch(bucket=bucket, inputs=inputs)


def make(queue: str, eng: NarrowedEngine):
  config = BatchingConfig(buckets=eng.buckets, max_queue_delay_s=0.02)
  if queue == "native":
    if native is None:
      pytest.skip(why)
    return QueuedRowRunner("m/1", eng, config, queue_factory=row_queue_factory(native))
  return ModelRunner("m/1", eng, config)


def request(x, k, answers, name):
  def answer(out, err):
    answers[name] = (out, err)
  return InferRequest({"x": x, "k": k}, len(x), CallbackSink(), time.perf_counter(), None, 0,
                      name, sink_token=answer)


@pytest.mark.parametrize("queue", ["native", "python"])
@pytest.mark.parametrize("kind", [np.int32, np.uint32])
def test_an_out_of_range_value_is_refused_at_admission_and_never_runs(queue, kind):
  eng = NarrowedEngine(kind)
  eng.warmup()
  runner = make(queue, eng)
  runner.start()
  info, rng, answers = np.iinfo(kind), np.random.default_rng(5), {}
  wide = np.int64 if kind is np.int32 else np.uint64
  edges = [info.min, info.max] if kind is np.int32 else [0, info.max]
  past = [info.min - 1, info.max + 1] if kind is np.int32 else [info.max + 1, 2**64 - 1]
  good, bad = {}, {}
  try:
    for i in range(12):
      n = int(rng.integers(1, 4))
      x = rng.random((n, 4)).astype(np.float32) + i
      k = rng.integers(-3 if kind is np.int32 else 0, 4, (n, 1)).astype(wide)
      k[0, 0] = edges[i % 2]  # the range's own ends are served
      if i % 3 == 2:
        k[-1, 0] = past[i % 2]
        bad[f"r{i}"] = (x, k)
      else:
        good[f"r{i}"] = (x, k)
    for name, (x, k) in {**good, **bad}.items():
      try:
        runner.submit(request(x, k, answers, name))
      except ServingError as e:
        answers[name] = (None, e)
    deadline = time.monotonic() + 20
    while len(answers) < len(good) + len(bad) and time.monotonic() < deadline:
      time.sleep(0.01)
  finally:
    runner.stop()
  for name, (x, k) in bad.items():
    out, err = answers[name]
    with pytest.raises(ServingError) as expected:  # what the engine says of the same values
      check_fits("k", k, kind)
    assert out is None and err.code is Code.INVALID_ARGUMENT
    assert err.message == expected.value.message
  for name, (x, k) in good.items():
    out, err = answers[name]
    assert err is None, err
    np.testing.assert_array_equal(out["z"], x * k.astype(np.float32))
  ran = np.concatenate(eng.ran)
  for name, (x, _) in good.items():  # each good row ran exactly once: no batch re-ran alone
    assert sum(int(np.all(ran == row, axis=1).sum()) for row in x) == len(x), name
  for name, (x, _) in bad.items():
    assert not any(np.all(ran == row, axis=1).any() for row in x), name
  assert runner.stats.fail_count == len(bad) and runner.stats.success_count == len(good)
