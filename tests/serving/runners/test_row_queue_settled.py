"""The native row queue answers a batch once: a batch already answered and then failed (a bug
after `complete`, or a second completion) keeps its answers, counts nothing twice, and a batch
failed first ignores a late completion. Driven through the queue's binding with Python
requests, checked against MockEngine's hand-worked outputs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.batching import BatchingConfig
from serving.engines.mock import MockEngine
from serving.frontend.native import load_extension
from serving.frontend.native_queue import row_queue_factory
from serving.types import CallbackSink, InferRequest

native, why = load_extension()
pytestmark = pytest.mark.skipif(native is None, reason=why)

INTERNAL = 13  # gRPC status code


def _queue_with_one_request(eng: MockEngine, x: np.ndarray, k: np.ndarray):
  """A queue holding one 3-row request, and the batch it plans for it."""
  q = row_queue_factory(native)(name="m/1", config=BatchingConfig(buckets=eng.buckets),
                                inputs=eng.inputs, outputs=eng.outputs, instances=1)
  req = InferRequest({"x": x, "k": k}, len(x), CallbackSink(), time.perf_counter(), None, 0,
                     "r1", sink_token=None)
  code, message = q.add(req, [x, k], len(x), req.arrival, req.deadline, req.priority)
  assert code == 0, message
  batch, expired, failed, held, _ = q.next(0, True, 1, 5.0, False)
  q.release(held)
  assert batch is not None and not expired and not failed
  return q, req, batch


def _outputs(eng: MockEngine, batch) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
  """The batch run on the engine: its outputs as the queue takes them, and as arrays."""
  raw = batch.inputs
  inputs = {t.name: raw[t.name].view(np.dtype(t.dtype)).reshape((batch.bucket, *t.shape[1:]))
            for t in eng.inputs}
  outs = eng.fetch(eng.dispatch(bucket=batch.bucket, inputs=inputs))
  return [np.ascontiguousarray(outs[t.name], np.dtype(t.dtype)).reshape(-1).view(np.uint8)
          for t in eng.outputs], outs


def _planned():
  """(x, k, queue, request, its batch, the batch's outputs for the queue, and as arrays)."""
  eng = MockEngine(buckets=(1, 2, 4))
  eng.warmup()
  rng = np.random.default_rng(3)
  x, k = rng.random((3, 4)).astype(np.float32), rng.integers(-3, 4, (3, 1)).astype(np.int32)
  q, req, batch = _queue_with_one_request(eng, x, k)
  return (x, k, q, req, batch, *_outputs(eng, batch))


def test_a_failure_after_the_answer_changes_nothing():
  x, k, q, req, batch, arrays, outs = _planned()
  backs, _, _ = q.complete(batch, arrays, 0.0, 0.0, 0.0, False, 0)
  assert [b[0] for b in backs] == [req] and len(q.take_metrics()["ok_s"]) == 1
  (_, start, rows, dest, _), = backs
  np.testing.assert_allclose(outs["y"][dest:dest + rows], 2.0 * x.sum(1, keepdims=True) + 1.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(outs["z"][dest:dest + rows], x * k.astype(np.float32))

  # The runner failing the same batch afterwards: nothing handed back, nothing counted.
  fail_backs, native_failed, held, _ = q.fail(batch, INTERNAL, "late failure", False)
  q.release(held)
  assert list(fail_backs) == [] and list(native_failed) == []
  again, _, _ = q.complete(batch, arrays, 0.0, 0.0, 0.0, False, 0)
  taken = q.take_metrics()
  assert list(again) == [] and len(taken["ok_s"]) == 0 and len(taken["buckets"]) == 0
  st = q.stats()
  assert (st["success_count"], st["fail_count"], st["execution_count"]) == (1, 0, 1)
  assert st["inference_count"] == 3


def test_a_completion_after_the_failure_changes_nothing():
  _, _, q, req, batch, arrays, _ = _planned()
  backs, _, held, _ = q.fail(batch, INTERNAL, "the batch failed", False)
  q.release(held)
  assert [(b[0], b[1], b[2]) for b in backs] == [(req, INTERNAL, "the batch failed")]
  late, _, _ = q.complete(batch, arrays, 0.0, 0.0, 0.0, False, 0)
  assert list(late) == [] and len(q.take_metrics()["ok_s"]) == 0
  st = q.stats()
  assert (st["success_count"], st["fail_count"]) == (0, 1)
