"""Scheduling by a latency target, on a simulated clock (no JAX): the queue-wait bound, admission
by the estimated finish at the measured drain rate, and an overloaded queue simulated end to
end (the hold for a fuller batch: test_slo_holds.py). Every test runs against the Python
Batcher and the C++ decisions of the native queue (the make_batcher fixture, conftest.py)."""

import pytest

from benchmarks import capacity_sim
from benchmarks.capacity_sim import Replica

from serving.batching import Admission, Pending, expired_by_deadline


def admitted(b, p):
  try:
    b.add(p)
    return True
  except Admission as e:
    return str(e)


def test_no_target_and_no_bound_never_expires(make_batcher):
  b = make_batcher(buckets=(1, 2, 4))
  b.add(Pending("a", 1, 0.0))
  d = b.decide(1e6, idle=False)  # an hour later, still queued behind a busy executor
  assert d.plan is None and d.expired == () and b.queued_requests == 1


def test_queue_wait_bound_sheds_unstarted_requests(make_batcher):
  b = make_batcher(buckets=(1, 2, 4), max_queue_wait_s=0.05)
  b.add(Pending("plain", 1, 0.0))
  b.add(Pending("own-deadline", 1, 0.0, deadline=0.03))
  b.add(Pending("late-deadline", 1, 0.01, deadline=1.0))
  assert b.decide(0.029, idle=False).expired == ()
  d = b.decide(0.031, idle=False)
  assert [p.item for p in d.expired] == ["own-deadline"]
  d = b.decide(0.0501, idle=False)
  assert [p.item for p in d.expired] == ["plain"]
  d = b.decide(0.0601, idle=False)  # the bound comes before its own deadline
  assert [p.item for p in d.expired] == ["late-deadline"]
  if make_batcher.impl == "python":
    b2 = make_batcher(buckets=(1,), max_queue_wait_s=0.05)
    own, plain = Pending("o", 1, 0.0, deadline=0.01), Pending("p", 1, 0.0)
    b2.add(own)
    b2.add(plain)
    assert expired_by_deadline(own) and not expired_by_deadline(plain)


def test_a_target_bounds_the_wait_and_a_started_request_finishes(make_batcher):
  b = make_batcher(buckets=(1, 2, 4), latency_slo_s=0.02)
  b.add(Pending("big", 6, 0.0))
  d = b.decide(0.001, idle=True)
  assert d.plan is not None and d.plan.rows == 4  # started: the rest is never shed
  d = b.decide(0.5, idle=True)
  assert d.expired == () and d.plan is not None and d.plan.rows == 2


def _backlog(b, rows, take_every_s, takes):
  """`rows` one-row requests at t=0, then full batches taken every `take_every_s` seconds."""
  for i in range(rows):
    b.add(Pending(i, 1, 0.0))
  for k in range(takes):
    d = b.decide(k * take_every_s, idle=True)
    assert d.plan is not None and d.plan.rows == 8
  return (takes - 1) * take_every_s


@pytest.mark.parametrize("take_every_s,most_queued", [(0.004, 62), (0.001, 247)])
def test_admission_uses_the_measured_drain_rate(make_batcher, take_every_s, most_queued):
  """Full batches of 8 rows are timed at 1 ms each, but the queue moves one only every
  `take_every_s` (the host path's cost): 2,000 or 8,000 rows/s. With a 41 ms target (32.8 ms
  budget) a new request is admitted while the rows ahead of it, at that rate, plus the batch
  the executor holds and its own (1 ms each) fit the budget: 61 rows ahead at 2,000 rows/s,
  246 at 8,000."""
  b = make_batcher(buckets=(1, 2, 4, 8), latency_slo_s=0.041)
  b.observe(8, 0.001)
  now = _backlog(b, 48, take_every_s, 5)  # 8 rows still queued; 4 drain samples
  n = 100
  while (res := admitted(b, Pending(n, 1, now))) is True:
    n += 1
  assert b.queued_rows == most_queued
  assert res == (f"overloaded: the queue ahead needs about {most_queued * 1e3 / (8 / take_every_s) + 2:.0f}"
                 " ms, beyond the model's 41 ms latency target; retry later or add capacity")


def test_a_drain_rate_not_measured_again_for_a_second_is_forgotten(make_batcher):
  """The queue drained 2,000 rows/s while backlogged (full batches of 8 every 4 ms, each timed
  at 1 ms); the budget of a 41 ms target is 32.8 ms. Half a second later, with no backlog
  since, that rate still holds: a new 1-row request is admitted while the rows ahead at 2,000
  rows/s plus its own batch (1 ms) fit, so 63 rows ahead, 64 queued. After more than a second
  the rate was measured on other traffic (a 1-row mix drains far fewer rows/s than a 32-row
  one) and is forgotten: the rows ahead and its own run as batches of 8 at 1 ms each, so 255
  rows ahead (32 batches), 256 queued. Kept, the old rate would refuse the new traffic for
  good: refusing all but 63 rows, the queue never backlogs again to measure a new one."""
  for later_s, most_queued in [(0.5, 64), (1.1, 256)]:
    b = make_batcher(buckets=(1, 2, 4, 8), latency_slo_s=0.041)
    b.observe(8, 0.001)
    now = _backlog(b, 48, 0.004, 5) + later_s  # 8 rows still queued; 4 drain samples
    n = 100
    while admitted(b, Pending(n, 1, now)) is True:
      n += 1
    assert b.queued_rows == most_queued, later_s


def test_without_a_target_admission_uses_the_wait_bound(make_batcher):
  b = make_batcher(buckets=(1, 2, 4, 8), max_queue_wait_s=0.0207)
  b.observe(8, 0.001)
  now = _backlog(b, 48, 0.004, 5)
  n = 100
  while (res := admitted(b, Pending(n, 1, now))) is True:
    n += 1
  assert b.queued_rows == 38  # 37 rows ahead / 2,000 rows/s + 2 x 1 ms = 20.5 ms <= 20.7 ms
  assert "beyond the 21 ms queue-wait bound" in res


def test_a_bucket_timed_once_slowly_does_not_keep_shedding(make_batcher):
  """Bucket 64 was timed once at 9 ms (a slow moment) and bucket 32 lately at 2 ms. 40 rows
  ahead and 8 more run as one batch of 64, which takes at most two batches of 32: 4 ms, well
  inside a 10 ms target's 8 ms budget. Taken at face value, 9 ms would refuse it, and every
  request that would ever fill a batch of 64 again."""
  b = make_batcher(buckets=(8, 16, 32, 64), latency_slo_s=0.01)
  b.observe(64, 0.009)
  b.observe(32, 0.002)
  b.add(Pending("ahead", 40, 0.0))
  assert admitted(b, Pending("probe", 8, 0.0)) is True


@pytest.mark.parametrize("arrival,admit", [(0.0005, False), (0.02, True)])
def test_only_what_is_left_of_the_running_batch_counts(make_batcher, arrival, admit):
  """A batch of 64 (4.5 ms) was taken at t=0. A request with 20 rows ahead (one batch of 64,
  4.5 ms) against a 10 ms target (8 ms budget): 0.5 ms later the running batch has 4 ms left
  and 4 + 4.5 ms does not fit; 20 ms later it is long done and 4.5 ms fits."""
  b = make_batcher(buckets=(16, 32, 64), latency_slo_s=0.01)
  b.observe(64, 0.0045)
  b.add(Pending("first", 64, 0.0))
  d = b.decide(0.0, idle=True)
  assert d.plan is not None and d.plan.rows == 64
  b.add(Pending("ahead", 20, arrival))
  got = admitted(b, Pending("probe", 20, arrival))
  assert (got is True) == admit, got
  if not admit:
    assert "needs about 8 ms" in got  # 4.0 ms left of the running batch + 4.5 ms


@pytest.mark.parametrize("executors,admit", [(1, False), (2, True)])
def test_full_batches_ahead_run_on_every_executor(make_batcher, executors, admit):
  """32 rows ahead and 8 more are five full batches of 8 rows, 2 ms each: one executor runs
  them one after another (10 ms), two run four of them in pairs and then the request's own
  (4 + 2 = 6 ms); the 10 ms target's budget is 8 ms."""
  b = make_batcher(executors, buckets=(4, 8), latency_slo_s=0.01)
  b.observe(8, 0.002)
  b.add(Pending("ahead", 32, 0.0))
  got = admitted(b, Pending("probe", 8, 0.0))
  assert (got is True) == admit, got


def simulate(b, *, rate, seconds):
  """One executor behind `b` (a batch takes 1 ms + 10 µs x bucket), one-row requests arriving
  as a Poisson process for `seconds` (benchmarks/capacity_sim.py). Returns (latencies, shed)."""
  replica = Replica({k: 1e-3 + 1e-5 * k for k in b.config.buckets})
  r = capacity_sim.simulate(replica, rate=rate, rows=1, seconds=seconds, batcher=b)
  return r.latencies_s, r.shed


def test_overload_is_shed_and_the_admitted_meet_the_target(make_batcher):
  """2.2x the executor's capacity for 0.5 s: with a 25 ms target every answered request finishes
  within it, the executor still runs near capacity, and the excess is shed; with today's row
  bound alone the same load queues for hundreds of milliseconds."""
  capacity = 256 / (1e-3 + 1e-5 * 256)  # rows/s at full batches
  lat, shed = simulate(make_batcher(buckets=(1, 8, 32, 256), latency_slo_s=0.025),
                       rate=2.2 * capacity, seconds=0.5)
  assert max(lat) <= 0.025
  assert len(lat) >= 0.9 * capacity * 0.5  # shedding does not cost throughput
  assert 0.4 < shed / (len(lat) + shed) < 0.6
  lat0, shed0 = simulate(make_batcher(buckets=(1, 8, 32, 256)), rate=2.2 * capacity, seconds=0.5)
  assert shed0 == 0 and sorted(lat0)[int(0.99 * len(lat0))] > 0.2


def test_one_stall_does_not_shed_everyone(make_batcher):
  """A single 1 s pause (a collector, a busy core, a new version's first batch) between two
  takes and in one batch's time: a request with 32 rows ahead (about 10 ms of measured work)
  is still admitted against a 100 ms target."""
  b = make_batcher(buckets=(1, 2, 4, 8), latency_slo_s=0.1)
  b.observe(8, 0.001)
  t, n = 0.0, 0
  for step in range(8):
    if step == 7:
      t += 1.0  # the stall
    for _ in range(8):
      b.add(Pending(n, 1, t))
      n += 1
    if step == 0:
      for _ in range(8):  # keep a full batch waiting after every take: backlogged
        b.add(Pending(n, 1, t))
        n += 1
    d = b.decide(t, idle=True)
    assert d.plan is not None and d.plan.rows == 8, step
    t += 0.001
  b.observe(8, 1.0)
  for _ in range(32):
    b.add(Pending(n, 1, t))
    n += 1
  assert b.queued_rows == 32  # those queued before the stall waited past the 100 ms bound
  assert admitted(b, Pending("probe", 1, t)) is True  # unclamped, the stall alone would say 0.8 s
