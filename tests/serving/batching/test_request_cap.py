"""`BatchingConfig.max_batch_requests` (context models: one context row per request, compiled up
to the largest request bucket): a batch holds at most that many requests, and that many queued
requests make a full batch even when their rows do not fill the largest bucket. Hand-worked."""

import pytest

from serving.batching import BatchingConfig, Batcher, Pending


def make(max_requests, buckets=(1, 4, 16), delay=0.010, idle_dispatch=False):
  return Batcher(BatchingConfig(buckets=buckets, max_queue_delay_s=delay,
                                dispatch_when_idle=idle_dispatch, max_queue_rows=64,
                                max_batch_requests=max_requests))


def add(b, name, rows, t=0.0):
  b.add(Pending(name, rows, t))


def layout(plan):
  return [(s.pending.item, s.start, s.rows, s.dest) for s in plan.slices]


def test_config_validates_the_cap():
  with pytest.raises(ValueError, match="max_batch_requests must be >= 1"):
    BatchingConfig(max_batch_requests=0)


def test_that_many_requests_are_a_full_batch_and_the_rest_wait():
  b = make(max_requests=3)
  for i, name in enumerate("abcde"):
    add(b, name, 1, t=i * 1e-4)
  d = b.decide(0.001, idle=False)  # busy executor, delay not reached: only a full batch goes
  assert layout(d.plan) == [("a", 0, 1, 0), ("b", 0, 1, 1), ("c", 0, 1, 2)]
  assert d.plan.bucket == 4
  assert b.queued_requests == 2 and b.queued_rows == 2
  assert b.decide(0.001, idle=False).plan is None  # 2 requests, 2 rows: not full
  d = b.decide(0.02, idle=True)
  assert layout(d.plan) == [("d", 0, 1, 0), ("e", 0, 1, 1)]


def test_rows_still_bound_a_batch_and_splits_count_once_per_batch():
  b = make(max_requests=2)
  add(b, "big", 20)
  add(b, "small", 1)
  d = b.decide(0.0, idle=True)
  assert layout(d.plan) == [("big", 0, 16, 0)]
  d = b.decide(0.0, idle=True)
  assert layout(d.plan) == [("big", 16, 4, 0), ("small", 0, 1, 4)]
  assert d.plan.bucket == 16


def test_no_cap_keeps_the_row_only_behaviour():
  b = make(max_requests=None)
  for name in "abcde":
    add(b, name, 1)
  assert b.decide(0.001, idle=False).plan is None  # 5 rows of 16: not full, executor busy
  assert len(b.decide(0.02, idle=True).plan.slices) == 5
