"""The batcher's decisions, checked by hand-worked cases (no JAX, no threads).

Every case runs against both implementations: the Python `Batcher` and the C++ decisions the
native batch queue uses (through `serving.frontend.native_queue.NativeBatcher`).
"""

import pytest

from serving.batching import Admission, BatchingConfig, Batcher, Pending
from serving.frontend.native import load_extension
from serving.frontend.native_queue import NativeBatcher

IMPLS = ["python", "native"]


@pytest.fixture(params=IMPLS, autouse=True)
def impl(request, monkeypatch):
  """Which batcher `make` builds; the native one skips (with the reason) when not compiled."""
  if request.param == "native" and load_extension()[0] is None:
    pytest.skip(load_extension()[1])
  monkeypatch.setattr(make, "impl", request.param, raising=False)
  return request.param


def make(buckets=(1, 2, 4, 8), delay=0.010, idle_dispatch=False, max_rows=64):
  cfg = BatchingConfig(buckets=buckets, max_queue_delay_s=delay, dispatch_when_idle=idle_dispatch,
                       max_queue_rows=max_rows)
  if getattr(make, "impl", "python") == "native":
    return NativeBatcher(cfg, load_extension()[0])
  return Batcher(cfg)


def add(b, name, rows, t=0.0, **kw):
  p = Pending(name, rows, t, **kw)
  b.add(p)
  return p


def layout(plan):
  return [(s.pending.item, s.start, s.rows, s.dest) for s in plan.slices]


def test_config_validates_buckets():
  with pytest.raises(ValueError, match="strictly increasing"):
    BatchingConfig(buckets=(4, 2))
  with pytest.raises(ValueError, match="one full batch"):
    BatchingConfig(buckets=(1, 8), max_queue_rows=4)
  cfg = BatchingConfig(buckets=(1, 2, 4, 8))
  assert [cfg.bucket_for(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
  with pytest.raises(ValueError):
    cfg.bucket_for(9)


def test_waits_for_delay_then_pads_to_smallest_bucket():
  b = make()
  add(b, "a", 3, t=0.0)
  d = b.decide(0.004, idle=False)
  assert d.plan is None and d.wait_s == pytest.approx(0.006)
  assert b.decide(0.010, idle=False).plan is None  # timed out, but a batch is running
  d = b.decide(0.010, idle=True)
  assert d.plan.bucket == 4 and d.plan.rows == 3 and d.plan.padding == 1
  assert layout(d.plan) == [("a", 0, 3, 0)]
  assert b.queued_rows == 0


def test_full_batch_goes_at_once_and_fifo_packing():
  b = make()
  add(b, "a", 3, t=0.0)
  add(b, "b", 4, t=0.001)
  add(b, "c", 2, t=0.002)
  d = b.decide(0.002, idle=False)  # 9 rows >= 8: full
  assert d.plan.bucket == 8
  assert layout(d.plan) == [("a", 0, 3, 0), ("b", 0, 4, 3), ("c", 0, 1, 7)]
  assert b.queued_rows == 1
  d = b.decide(0.003, idle=True)  # nothing else: wait for the delay unless idle dispatch
  assert d.plan is None
  d = b.decide(0.013, idle=True)
  assert layout(d.plan) == [("c", 1, 1, 0)] and d.plan.bucket == 1
  assert d.plan.slices[0].last


def test_large_request_is_split_across_batches():
  b = make()
  add(b, "big", 19, t=0.0)
  plans = [b.decide(0.0, idle=False).plan for _ in range(2)]
  plans.append(b.decide(1.0, idle=True).plan)
  assert [layout(p) for p in plans] == [[("big", 0, 8, 0)], [("big", 8, 8, 0)],
                                        [("big", 16, 3, 0)]]
  assert [p.bucket for p in plans] == [8, 8, 4]
  assert [s.last for p in plans for s in p.slices] == [False, False, True]


def test_idle_dispatch_sends_lone_request_immediately():
  b = make(idle_dispatch=True)
  add(b, "a", 1, t=0.0)
  assert b.decide(0.0, idle=False).plan is None  # busy: let the batch grow
  d = b.decide(0.0, idle=True)
  assert layout(d.plan) == [("a", 0, 1, 0)] and d.plan.bucket == 1


def test_priority_overtakes_fifo():
  b = make()
  add(b, "low1", 4, t=0.0, priority=5)
  add(b, "low2", 4, t=0.0, priority=5)
  add(b, "high", 2, t=0.001, priority=1)
  d = b.decide(0.001, idle=False)
  assert layout(d.plan) == [("high", 0, 2, 0), ("low1", 0, 4, 2), ("low2", 0, 2, 6)]


def test_expired_requests_are_never_planned():
  b = make()
  add(b, "late", 2, t=0.0, deadline=0.005)
  add(b, "ok", 1, t=0.0, deadline=1.0)
  d = b.decide(0.006, idle=False)
  assert [p.item for p in d.expired] == ["late"] and d.plan is None
  d = b.decide(0.011, idle=True)
  assert layout(d.plan) == [("ok", 0, 1, 0)]
  assert b.queued_rows == 0


def test_started_split_request_is_finished_even_past_deadline():
  b = make()
  add(b, "big", 12, t=0.0, deadline=0.5)
  assert b.decide(0.0, idle=False).plan.rows == 8
  d = b.decide(1.0, idle=True)
  assert not d.expired and layout(d.plan) == [("big", 8, 4, 0)]


def test_queue_bound_refuses_without_side_effects():
  b = make(max_rows=10)
  add(b, "a", 8)
  with pytest.raises(Admission, match="queue full"):
    add(b, "b", 3)
  assert b.queued_rows == 8 and b.queued_requests == 1


def test_remove_and_drain():
  b = make()
  a = add(b, "a", 2)
  add(b, "b", 3)
  b.remove([a])
  assert b.queued_rows == 3
  assert [p.item for p in b.drain()] == ["b"]
  assert b.queued_rows == 0 and b.decide(0.0, idle=True).plan is None


def timed(ms_by_bucket, rows, max_rows=1024):
  """An idle-dispatch batcher whose buckets took `ms_by_bucket`, holding requests r0.. of `rows`."""
  b = make(buckets=tuple(ms_by_bucket), idle_dispatch=True, max_rows=max_rows)
  for bucket, ms in ms_by_bucket.items():
    b.observe(bucket, ms / 1e3)
  for i, n in enumerate(rows):
    add(b, f"r{i}", n, t=0.0)
  return b


def test_partial_batch_runs_the_bucket_that_moves_most_rows_per_second():
  # Compute-bound times (a 128-row batch costs twice a 64-row one): 5 x 32 = 160 queued rows
  # run as 128 now (no padding, 128 rows in 1 ms) rather than 256 (160 useful rows in 2 ms).
  b = timed({32: 0.3, 64: 0.5, 128: 1.0, 256: 2.0}, [32] * 5)
  d = b.decide(0.0, idle=True)
  assert d.plan.bucket == 128 and d.plan.padding == 0
  assert layout(d.plan) == [(f"r{i}", 0, 32, 32 * i) for i in range(4)]
  assert b.queued_rows == 32  # r4 waits for the next batch
  d = b.decide(0.0, idle=True)
  assert layout(d.plan) == [("r4", 0, 32, 0)] and d.plan.bucket == 32


def test_padding_is_kept_when_the_bigger_bucket_costs_little_more():
  # Overhead-bound times (256 rows cost barely more than 128): pad 160 up to 256, all at once.
  b = timed({32: 0.9, 64: 0.95, 128: 1.0, 256: 1.1}, [32] * 5)
  d = b.decide(0.0, idle=True)
  assert d.plan.bucket == 256 and d.plan.rows == 160 and b.queued_rows == 0


def test_smaller_bucket_must_win_by_the_margin():
  # 96 rows: bucket 128 moves 96 rows per 1.0 ms; bucket 64 moves 64 per 0.62 ms (103k/s), only
  # 8% better than 96k/s: under the 15% margin, so all 96 rows go now, padded to 128.
  assert timed({32: 0.5, 64: 0.62, 128: 1.0}, [32] * 3).decide(0.0, idle=True).plan.bucket == 128
  # Untimed buckets are never chosen over the natural one.
  b = make(buckets=(32, 64, 128), idle_dispatch=True, max_rows=1024)
  b.observe(128, 1e-3)
  for i in range(3):
    add(b, f"r{i}", 32, t=0.0)
  assert b.decide(0.0, idle=True).plan.bucket == 128


def test_smaller_bucket_never_splits_a_request():
  # One 5-row request (the rest of a split one): bucket 4 would be faster per row but would leave
  # a single row of the same request for another batch; it runs whole, padded to 8.
  b = timed({1: 0.1, 2: 0.2, 4: 0.4, 8: 1.6}, [5], max_rows=64)
  d = b.decide(0.0, idle=True)
  assert d.plan.bucket == 8 and layout(d.plan) == [("r0", 0, 5, 0)]
  # Two requests of 3 and 2 rows: bucket 4 takes "b" whole (3 rows in 0.4 ms beats 5 in 1.6).
  add(b, "b", 3, t=0.0)
  add(b, "c", 2, t=0.0)
  d = b.decide(0.0, idle=True)
  assert d.plan.bucket == 4 and layout(d.plan) == [("b", 0, 3, 0)]


def test_deadline_admission_boundary_worked_by_hand():
  """Buckets up to 8, a full batch timed at 10 ms, half of the time left kept as headroom."""
  b = make()
  b.observe(8, 0.010)
  add(b, "ahead", 8, t=0.0)
  # 8 rows ahead + 1 = 9 rows: two full batches, plus the two the executor may hold (one
  # running, one prepared): 4 x 10 ms = 40 ms, which must fit in half the time left: 80 ms.
  assert b.estimated_wait_s(1, 0) == pytest.approx(0.040)
  with pytest.raises(Admission, match="overloaded"):
    add(b, "tight", 1, t=0.0, deadline=0.079)
  assert (b.queued_rows, b.queued_requests) == (8, 1)  # a refusal leaves no trace
  add(b, "fits", 1, t=0.0, deadline=0.081)
  # Its own rows count too: 9 ahead + 8 = 17 rows, 3 full batches + 2 = 50 ms: 100 ms needed.
  with pytest.raises(Admission, match="overloaded"):
    add(b, "big", 8, t=0.0, deadline=0.099)
  add(b, "big", 8, t=0.0, deadline=0.101)
  # A higher priority (lower number) waits only for rows at its level or above: none here.
  add(b, "urgent", 1, t=0.0, deadline=1e-6, priority=-1)
  assert (b.queued_rows, b.queued_requests) == (18, 4)
  # The refusal is measured from the request's arrival, not from time zero.
  with pytest.raises(Admission, match="overloaded"):
    add(b, "late", 1, t=1.0, deadline=1.099)  # 18 + 1 rows: 3 + 2 batches, 100 ms needed
  add(b, "late", 1, t=1.0, deadline=1.101)


def test_no_deadline_estimate_before_a_batch_was_timed():
  b = make()
  add(b, "ahead", 8, t=0.0)
  assert b.estimated_wait_s(1, 0) is None
  add(b, "hopeful", 1, t=0.0, deadline=1e-6)  # nothing measured: admitted (it may expire)
  assert (b.queued_rows, b.queued_requests) == (9, 2)


def _admits(b, priority, now, left_s):
  """Whether a 1-row request at `priority` with `left_s` before its deadline is admitted; an
  admitted probe is removed again (and must leave the queue as it was)."""
  before = (b.queued_rows, b.queued_requests)
  probe = Pending("probe", 1, now, now + left_s, priority)
  try:
    b.add(probe)
  except Admission:
    assert (b.queued_rows, b.queued_requests) == before
    return False
  b.remove([probe])
  assert (b.queued_rows, b.queued_requests) == before
  return True


def test_queue_bookkeeping_matches_a_recount_through_random_operations():
  """Rows and requests queued, expiry, and what admission counts as queued ahead of each
  priority agree with our own model of the queue after every add, batch, expiry and removal."""
  import random

  rng = random.Random(0)
  b = make(buckets=(1, 2, 4, 8, 16), max_rows=10_000)
  b.observe(16, 0.002)
  live, now, n = [], 0.0, 0
  for _ in range(3000):
    now += rng.uniform(0, 0.002)
    op = rng.random()
    if op < 0.55:
      deadline = now + rng.uniform(0.0, 0.05) if rng.random() < 0.7 else None
      p = Pending(n, rng.randint(1, 20), now, deadline, rng.choice((0, 1, 2)))
      n += 1
      try:
        b.add(p)
        live.append(p)
      except Admission:  # refused at the door (deadline too close): must leave no trace
        pass
    elif op < 0.9:
      expected_expired = {p.item for p in live
                          if p.deadline is not None and p.deadline <= now and p.taken == 0}
      d = b.decide(now, idle=rng.random() < 0.5)
      assert {p.item for p in d.expired} == expected_expired
      live = [p for p in live if p.item not in expected_expired]
    elif live:
      gone = rng.sample(live, k=min(len(live), rng.randint(1, 3)))
      b.remove(gone)
      live = [p for p in live if p not in gone]
    live = [p for p in live if p.remaining]  # finished requests leave the queue
    assert b.queued_rows == sum(p.remaining for p in live)
    assert b.queued_requests == len(live)
    for prio in (0, 1, 2):
      # A 1 us deadline is hopeless behind any queued row (at least 3 x 2 ms), and met when
      # nothing is queued at this priority or above; 10 s is met behind any queue this test builds.
      ahead = any(p.priority <= prio for p in live)
      assert _admits(b, prio, now, 1e-6) is not ahead, (prio, [p.priority for p in live])
      assert _admits(b, prio, now, 10.0)
