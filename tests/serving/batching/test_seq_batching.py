"""The 2-D (batch x sequence) batcher's decisions, by hand-worked cases (no JAX, no threads)."""

import pytest

from serving.batching import Admission, BatchingConfig, Pending
from serving.batching import SeqBatcher, SeqBatchPlan, check_seq_buckets


def make(buckets=(1, 2, 4, 8), seq=(4, 8, 16), delay=0.010, idle_dispatch=False, max_rows=64,
         **kw):
  cfg = BatchingConfig(buckets=buckets, max_queue_delay_s=delay, dispatch_when_idle=idle_dispatch,
                       max_queue_rows=max_rows, **kw)
  return SeqBatcher(cfg, seq, length_of=lambda item: item[1])


def add(b, name, length, rows=1, t=0.0, **kw):
  p = Pending((name, length), rows, t, **kw)
  b.add(p)
  return p


def layout(plan):
  return [(s.pending.item[0], s.start, s.rows, s.dest) for s in plan.slices]


def test_bucket_validation_and_lookup():
  with pytest.raises(ValueError, match="strictly increasing"):
    check_seq_buckets((16, 8))
  with pytest.raises(ValueError):
    check_seq_buckets(())
  b = make()
  assert [b.seq_bucket_for(n) for n in (1, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]
  with pytest.raises(ValueError, match="exceeds the largest sequence bucket 16"):
    b.seq_bucket_for(17)
  with pytest.raises(ValueError, match=">= 1"):
    b.seq_bucket_for(0)


def test_requests_are_routed_by_length_and_never_padded_to_a_longer_queue():
  b = make(idle_dispatch=True)
  add(b, "short", 3, t=0.0)
  add(b, "long", 12, t=0.001)
  add(b, "mid", 5, t=0.002)
  add(b, "short2", 2, t=0.003)
  assert b.queue_rows() == {4: 2, 8: 1, 16: 1}
  assert b.queued_rows == 4 and b.queued_requests == 4
  seen = []
  for _ in range(3):
    d = b.decide(0.004, idle=True)
    assert isinstance(d.plan, SeqBatchPlan)
    seen.append((d.plan.grid_point, layout(d.plan)))
  # Idle: the queue holding the oldest request goes first; each batch is one sequence bucket.
  assert seen == [((2, 4), [("short", 0, 1, 0), ("short2", 0, 1, 1)]),
                  ((1, 16), [("long", 0, 1, 0)]),
                  ((1, 8), [("mid", 0, 1, 0)])]
  assert b.decide(0.004, idle=True).plan is None and b.queued_rows == 0


def test_waits_for_the_earliest_deadline_when_nothing_is_ready():
  b = make()
  add(b, "a", 10, t=0.000)
  add(b, "b", 3, t=0.002)
  d = b.decide(0.005, idle=False)
  assert d.plan is None and d.wait_s == pytest.approx(0.005)  # "a" is due at 0.010
  d = b.decide(0.010, idle=False)
  assert d.plan.grid_point == (1, 16) and layout(d.plan) == [("a", 0, 1, 0)]
  d = b.decide(0.011, idle=False)
  assert d.plan is None and d.wait_s == pytest.approx(0.001)  # "b" is due at 0.012
  assert b.decide(0.0, idle=False).wait_s is not None
  b.decide(0.012, idle=False)
  assert b.decide(0.02, idle=False).wait_s is None  # empty: sleep until something arrives


def test_a_full_queue_goes_before_a_younger_partial_one():
  b = make()
  add(b, "old", 12, t=0.000)  # not overdue yet
  for i in range(8):
    add(b, f"s{i}", 3, t=0.001)
  d = b.decide(0.002, idle=False)
  assert d.plan.grid_point == (8, 4) and d.plan.rows == 8
  assert b.decide(0.003, idle=False).plan is None


def test_an_overdue_request_beats_a_full_queue_holding_younger_requests():
  b = make()
  add(b, "old", 12, t=0.000)
  for i in range(8):
    add(b, f"s{i}", 3, t=0.005)
  d = b.decide(0.010, idle=False)  # both ready: "old" waited longer
  assert d.plan.grid_point == (1, 16)
  d = b.decide(0.010, idle=False)
  assert d.plan.grid_point == (8, 4)


def test_bounded_delay_under_a_flood_of_short_requests():
  """A constantly full short queue cannot starve a long request: it runs once it is the oldest."""
  b = make(max_rows=1024)
  add(b, "long", 15, t=0.0)
  t, order = 0.0, []
  for step in range(20):
    t += 0.001
    for i in range(8):
      add(b, f"s{step}.{i}", 2, t=t)
    d = b.decide(t, idle=False)
    order.append(d.plan.seq_bucket if d.plan else None)
  # Full short batches run until "long" is overdue (t=0.010); then it runs next.
  assert order.index(16) == 9 and order.count(16) == 1
  assert all(o == 4 for o in order[:9])


def test_priority_wins_across_queues():
  b = make(idle_dispatch=True)
  add(b, "low", 3, t=0.0, priority=5)
  add(b, "high", 12, t=0.001, priority=1)
  assert b.decide(0.002, idle=True).plan.seq_bucket == 16
  assert b.decide(0.002, idle=True).plan.seq_bucket == 4


def test_long_requests_are_split_within_their_queue():
  b = make(idle_dispatch=True)
  add(b, "big", 7, rows=11, t=0.0)
  d1 = b.decide(0.0, idle=True)
  d2 = b.decide(0.0, idle=True)
  assert d1.plan.grid_point == (8, 8) and layout(d1.plan) == [("big", 0, 8, 0)]
  assert d2.plan.grid_point == (4, 8) and layout(d2.plan) == [("big", 8, 3, 0)]
  assert d2.plan.slices[0].last and d2.plan.padding == 1


def test_expired_requests_are_reported_from_every_queue():
  b = make()
  add(b, "late", 12, t=0.0, deadline=0.003)
  add(b, "fine", 3, t=0.0)
  d = b.decide(0.004, idle=False)
  assert [p.item[0] for p in d.expired] == ["late"] and d.plan is None
  assert b.queue_rows() == {4: 1, 8: 0, 16: 0}


def test_admission_bounds_all_queues_together():
  b = make(buckets=(1, 2, 4, 8), max_rows=9, max_queue_requests=3)
  add(b, "a", 3, rows=4)
  add(b, "b", 12, rows=3)
  with pytest.raises(Admission, match="max_queue_rows=9"):
    add(b, "c", 6, rows=3)
  add(b, "c", 6, rows=1)
  with pytest.raises(Admission, match="max_queue_requests"):
    add(b, "d", 6, rows=1)
  with pytest.raises(ValueError, match="exceeds the largest"):
    add(b, "e", 99)


def test_remove_and_drain():
  b = make()
  a = add(b, "a", 3, t=0.0)
  add(b, "b", 12, t=0.001)
  add(b, "c", 5, t=0.002)
  b.remove([a])
  assert b.queue_rows() == {4: 0, 8: 1, 16: 1}
  assert [p.item[0] for p in b.drain()] == ["b", "c"]
  assert b.queued_rows == 0 and b.decide(1.0, idle=True).plan is None


def test_batch_timings_reach_the_queue_that_ran_them():
  """A slow long-sequence queue sheds deadline-bound requests; the short queue still admits."""
  b = make(buckets=(1, 2), idle_dispatch=True, max_rows=64)
  for i in range(3):
    add(b, f"l{i}", 12, rows=2, t=0.0)
  b.decide(0.0, idle=True)  # releases (2, 16)
  b.observe(2, 1.0)  # that full batch took a second
  with pytest.raises(Admission, match="overloaded"):
    add(b, "late", 12, t=0.0, deadline=0.5)
  add(b, "short", 3, t=0.0, deadline=0.5)  # the 4-token queue has no such estimate


def test_a_queue_holding_for_a_fuller_batch_says_how_long_and_lets_another_run():
  """Batch times of 100 µs + 5 µs per row at every sequence bucket and 10,000 rows/s of length-8
  requests: the length-8 queue holds a lone request 0.3 ms for bucket 4 (the executor would be
  busy 1.05 of the time with one-row batches, 0.30 with four; slo.fill_wait_s). The runner is
  told to wait that long, not to ask again at once, and a length-16 request (a queue with no
  traffic to wait for) runs meanwhile."""
  b = make(buckets=(1, 2, 4, 8, 16), idle_dispatch=True, max_rows=4096, latency_slo_s=0.01)
  for seq in (4, 8, 16):
    for bucket in (1, 2, 4, 8, 16):
      b.seed(bucket, seq, 1e-4 + 5e-6 * bucket)
  t = 0.0
  for i in range(10_000):  # one second of traffic, full batches taken as they fill
    add(b, i, 8, t=t)
    b.decide(t, idle=False)
    t += 1e-4
  b.drain()
  add(b, "lone", 8, t=t)
  d = b.decide(t, idle=True)
  assert d.plan is None and d.wait_s == pytest.approx(3e-4, rel=0.01)
  add(b, "long", 16, t=t)
  d = b.decide(t, idle=True)
  assert d.plan is not None and d.plan.seq_bucket == 16 and layout(d.plan) == [("long", 0, 1, 0)]
  d = b.decide(t + 3.1e-4, idle=True)  # the hold is over: the lone request runs
  assert d.plan is not None and d.plan.seq_bucket == 8 and layout(d.plan) == [("lone", 0, 1, 0)]
