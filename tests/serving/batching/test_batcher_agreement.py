"""The Python Batcher and the C++ decisions of the native batch queue agree, step by step, on a
shared table of generated cases: the same adds (admitted or refused, with the same message), the
same batches, the same expiries and the same waits, under every batching configuration below,
with one executor and with two."""

import random

import pytest

from serving.batching import Admission, BatchingConfig, Batcher, Pending
from serving.frontend.native import load_extension
from serving.frontend.native_queue import NativeBatcher

native, why = load_extension()
pytestmark = pytest.mark.skipif(native is None, reason=why)

CONFIGS = [  # (buckets, delay, idle dispatch, max rows, max requests, timed buckets,
    #          latency target, queue-wait bound)
    ((1, 2, 4, 8), 0.010, False, 64, None, {}, None, None),
    ((1, 2, 4, 8, 16), 0.002, True, 200, 12, {16: 0.002}, None, None),
    ((32, 64, 128, 256), 0.001, True, 4096, None, {32: 3e-4, 64: 5e-4, 128: 1e-3, 256: 2e-3},
     None, None),
    ((1, 4, 16, 64), 0.0, True, 500, 30, {1: 1e-4, 4: 1.2e-4, 16: 2e-4, 64: 9e-4}, None, None),
    ((1, 2, 4, 8, 16), 0.002, True, 400, None, {16: 0.002, 4: 8e-4}, 0.02, None),
    ((1, 4, 16, 64), 0.001, True, 500, None, {1: 1e-4, 16: 2e-4, 64: 9e-4}, None, 0.015),
    ((1, 2, 4, 8), 0.003, False, 64, None, {8: 1e-3}, 0.01, None),
    # batch times mostly fixed cost: holds aim past the queued rows' own bucket
    ((1, 2, 4, 8, 16, 32), 0.002, True, 2000, None,
     {1: 5e-4, 2: 5.2e-4, 4: 5.5e-4, 8: 6e-4, 16: 7e-4, 32: 9e-4}, 0.01, None),
]


def _layout(d):
  plan = None if d.plan is None else (d.plan.bucket, [
      (s.pending.item, s.start, s.rows, s.dest, s.last) for s in d.plan.slices])
  return plan, sorted(p.item for p in d.expired), d.wait_s


def _add(b, p):
  try:
    b.add(p)
    return "ok"
  except Admission as e:
    return str(e)


@pytest.mark.parametrize("case", range(len(CONFIGS)))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("executors", [1, 2])
def test_python_and_native_decisions_agree(case, seed, executors):
  buckets, delay, idle_dispatch, max_rows, max_requests, timed, slo, wait = CONFIGS[case]
  cfg = BatchingConfig(buckets=buckets, max_queue_delay_s=delay, dispatch_when_idle=idle_dispatch,
                       max_queue_rows=max_rows, max_queue_requests=max_requests,
                       latency_slo_s=slo, max_queue_wait_s=wait)
  py_b, c_b = Batcher(cfg, executors=executors), NativeBatcher(cfg, native, executors=executors)
  for bucket, s in timed.items():
    py_b.observe(bucket, s)
    c_b.observe(bucket, s)
  rng = random.Random(seed * 100 + case)
  live: list[tuple[Pending, Pending]] = []
  now, n = 0.0, 0
  for step in range(1500):
    now += rng.choice((0.0, rng.uniform(0, 0.003)))
    op = rng.random()
    if op < 0.5:
      rows = rng.choice((1, 1, 2, 3, rng.randint(1, 2 * buckets[-1])))
      deadline = now + rng.uniform(0.0, 0.05) if rng.random() < 0.5 else None
      prio = rng.choice((0, 0, 1, 5))
      pair = (Pending(n, rows, now, deadline, prio), Pending(n, rows, now, deadline, prio))
      n += 1
      got = (_add(py_b, pair[0]), _add(c_b, pair[1]))
      assert got[0] == got[1], (step, got)
      if got[0] == "ok":
        live.append(pair)
    elif op < 0.85:
      idle = rng.random() < 0.6
      dp, dc = py_b.decide(now, idle=idle), c_b.decide(now, idle=idle)
      assert _layout(dp) == _layout(dc), step
      if dp.plan is not None and rng.random() < 0.5:  # the batch ran: its time is observed
        s = rng.uniform(1e-4, 3e-3)
        py_b.observe(dp.plan.bucket, s)
        c_b.observe(dc.plan.bucket, s)
    elif op < 0.92 and live:
      gone = rng.sample(live, k=min(len(live), rng.randint(1, 2)))
      py_b.remove([g[0] for g in gone])
      c_b.remove([g[1] for g in gone])
      live = [p for p in live if p not in gone]
    elif op < 0.96:
      assert (sorted(p.item for p in py_b.expire(now))
              == sorted(p.item for p in c_b.expire(now))), step
    else:
      rows, prio = rng.randint(1, 3 * buckets[-1]), rng.choice((0, 1, 5))
      assert py_b.estimated_wait_s(rows, prio) == pytest.approx(c_b.estimated_wait_s(rows, prio))
    assert (py_b.queued_rows, py_b.queued_requests) == (c_b.queued_rows, c_b.queued_requests)
    assert py_b.oldest_arrival() == c_b.oldest_arrival()
    assert py_b.head_priority() == c_b.head_priority()
    for prio in (0, 1, 5):
      assert py_b.estimated_wait_s(3, prio) == pytest.approx(c_b.estimated_wait_s(3, prio))
  assert [p.item for p in py_b.drain()] == [p.item for p in c_b.drain()]
