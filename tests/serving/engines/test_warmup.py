"""One warm-up loop for both bundle engines: every compiled point (batch bucket, or batch x
sequence bucket) is run and timed at load, and those times reach the runner's batcher before the
first request, so admission can refuse a deadline the queue cannot meet from the start."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest

import export
from serving.batching import BatchingConfig
from serving.engines import BundleEngine, SeqBundleEngine
from serving.runners import make_runner
from serving.types import CallbackSink, Code, InferRequest, ServingError

BATCH, SEQ = (1, 2), (4, 8)


def _seq_bundle(tmp_path):
  def fn(params, inputs):
    h = inputs["tokens"].astype(jnp.float32)[..., None] * params["w"]  # [B, S, 3]
    mask = (jnp.arange(h.shape[1])[None, :] < inputs["lengths"][:, None])[..., None]
    return {"v": (h * mask).sum(axis=1)}

  return export.export_model(
      fn, repository=tmp_path, name="seqm", params={"w": jnp.arange(3, dtype=jnp.float32)},
      inputs=[export.Input("tokens", "int32", ("batch", "seq")),
              export.Input("lengths", "int32", ("batch",))],
      config=export.ExportConfig(batch_buckets=BATCH, seq_buckets=SEQ))


def _row_bundle(tmp_path):
  return export.export_model(
      lambda p, i: {"y": i["x"] * p["s"]}, repository=tmp_path, name="rows",
      params={"s": jnp.float32(2.0)}, inputs=[export.Input("x", "float32", ("batch", 2))],
      config=export.ExportConfig(batch_buckets=BATCH))


def test_every_point_is_timed_at_warmup(tmp_path):
  seq = SeqBundleEngine(_seq_bundle(tmp_path))
  rows = BundleEngine(_row_bundle(tmp_path))
  for engine in (seq, rows):
    engine.warmup()
  assert set(seq.grid_seconds) == {(b, s) for b in BATCH for s in SEQ}
  assert set(rows.bucket_seconds) == set(BATCH)
  assert all(t > 0 for t in (*seq.grid_seconds.values(), *rows.bucket_seconds.values()))
  tokens = np.array([[1, 2, 3, 0, 0]], np.int32)  # length 5 runs in the 8-token bucket
  out = seq.fetch(seq.dispatch(bucket=1, inputs={"tokens": tokens,
                                                  "lengths": np.array([3], np.int32)}))
  np.testing.assert_allclose(out["v"], [[0.0, 6.0, 12.0]])  # (1+2+3) * w
  for engine in (seq, rows):
    engine.close()


def _request(answers: list, *, rows: int, length: int, deadline_s: float | None) -> InferRequest:
  now = time.perf_counter()
  return InferRequest({"tokens": np.ones((rows, length), np.int32),
                       "lengths": np.full((rows,), length, np.int32)}, rows, CallbackSink(), now,
                      deadline=None if deadline_s is None else now + deadline_s,
                      sink_token=lambda out, err: answers.append(err))


@pytest.mark.parametrize("length", [3, 8])
def test_a_sequence_model_refuses_an_unmeetable_deadline_before_its_first_batch(tmp_path,
                                                                                length):
  """Nothing has run yet: only warm-up times can tell that 1 ns is too short behind a queue."""
  engine = SeqBundleEngine(_seq_bundle(tmp_path))
  engine.warmup()
  runner = make_runner("seqm/1", engine, BatchingConfig(buckets=BATCH))  # not started: it queues
  answers: list = []
  runner.submit(_request(answers, rows=2, length=length, deadline_s=None))
  runner.submit(_request(answers, rows=1, length=length, deadline_s=60.0))  # ample time
  with pytest.raises(ServingError) as e:
    runner.submit(_request(answers, rows=1, length=length, deadline_s=1e-9))
  assert e.value.code is Code.RESOURCE_EXHAUSTED and "deadline" in e.value.message
  runner.stop(drain=False)  # the two queued requests are answered UNAVAILABLE
  assert [a.code for a in answers] == [Code.UNAVAILABLE, Code.UNAVAILABLE]
  engine.close()
