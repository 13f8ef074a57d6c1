"""Scheduler decisions, worked by hand and simulated at scale, without JAX."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from serving.generation.pages import pages_for
from serving.generation.scheduler import PrefillBucket, Scheduler, SchedulerConfig, State
from serving.types import Code, ServingError

BUCKETS = (PrefillBucket(8, 4), PrefillBucket(16, 2), PrefillBucket(32, 1))


def config(**kw) -> SchedulerConfig:
  base = dict(decode_batch=4, page_size=4, num_pages=17, max_seq_len=32, prefill_buckets=BUCKETS)
  return SchedulerConfig(**{**base, **kw})


def run_prefills(s: Scheduler, token: int = 7) -> list:
  """Executes schedule_prefill() as an engine would: one sampled token per row."""
  batches = s.schedule_prefill()
  for b in batches:
    for r in b.rows:
      s.append_token(r.seq_id, token)
  return batches


def test_scheduler_imports_without_jax():
  code = ("import sys; import serving.generation.scheduler, serving.generation.pages;"
          " assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_config_validation():
  with pytest.raises(ValueError, match="strictly increasing"):
    config(prefill_buckets=(PrefillBucket(16, 1), PrefillBucket(8, 1)))
  with pytest.raises(ValueError, match="max_seq_len"):
    config(prefill_buckets=(PrefillBucket(8, 1),))
  with pytest.raises(ValueError, match="decode_batch"):
    config(decode_batch=0)
  assert config().pages_per_seq == 8 and config().usable_pages == 16


def test_refusals():
  s = Scheduler(config(max_waiting=2))
  with pytest.raises(ServingError) as e:
    s.add("long", [1] * 32, 4)  # no room left to generate
  assert e.value.code is Code.INVALID_ARGUMENT
  with pytest.raises(ServingError) as e:
    s.add("empty", [], 4)
  assert e.value.code is Code.INVALID_ARGUMENT
  small = Scheduler(config(num_pages=5))  # 4 usable pages = 16 tokens
  with pytest.raises(ServingError) as e:
    small.add("big", [1] * 10, 10)
  assert e.value.code is Code.RESOURCE_EXHAUSTED
  small.add("fits", [1] * 10, 6)
  s.add("a", [1], 1)
  s.add("b", [1], 1)
  with pytest.raises(ServingError) as e:
    s.add("c", [1], 1)
  assert e.value.code is Code.RESOURCE_EXHAUSTED
  with pytest.raises(ServingError, match="already live"):
    s.add("a", [1], 1)


def test_prefill_groups_by_bucket_fcfs_and_fills_slots():
  s = Scheduler(config(max_prefill_batches_per_step=4))
  s.add("a", [1] * 5, 4)  # bucket 8
  s.add("b", [1] * 12, 4)  # bucket 16: not in a's batch
  s.add("c", [1] * 3, 4)  # bucket 8: joins a
  s.add("d", [1] * 7, 4)  # bucket 8: joins a
  s.add("e", [1] * 9, 4)  # bucket 16: after b
  s.add("f", [1] * 20, 4)  # bucket 32: no slot left
  batches = run_prefills(s)
  assert [(b.bucket.length, [r.seq_id for r in b.rows]) for b in batches] == [
      (8, ["a", "c", "d"]), (16, ["b"])]
  assert sorted(r.slot for b in batches for r in b.rows) == [0, 1, 2, 3]
  assert s.num_running == 4 and s.num_waiting == 2
  # Pages cover the prompt plus the first decoded token.
  for b in batches:
    for r in b.rows:
      assert len(r.pages) == pages_for(len(r.tokens) + 1, 4)
  s.check()


def test_later_arrivals_fill_the_heads_batch_but_the_head_goes_first():
  s = Scheduler(config(max_prefill_batches_per_step=4))
  s.add("a", [1] * 5, 4)  # bucket 8, the head
  s.add("b", [1] * 12, 4)  # bucket 16
  s.add("c", [1] * 2, 4)  # bucket 8: rides along with a
  (batch,) = run_prefills(s)[:1]
  assert [r.seq_id for r in batch.rows] == ["a", "c"]


def test_one_prefill_batch_per_step_by_default():
  s = Scheduler(config())
  s.add("a", [1] * 5, 4)
  s.add("b", [1] * 12, 4)
  assert [[r.seq_id for r in b.rows] for b in run_prefills(s)] == [["a"]]
  assert [[r.seq_id for r in b.rows] for b in run_prefills(s)] == [["b"]]


def test_decode_rows_positions_and_finish_frees_at_once():
  s = Scheduler(config())
  s.add("a", [5, 6, 7], 3)
  run_prefills(s, token=8)
  d = s.schedule_decode()
  (row,) = d.rows
  assert (row.token, row.position, row.num_generated) == (8, 3, 1)
  assert s.append_token("a", 9) is False
  assert s.append_token("a", 10) is True  # 3 generated = max_new_tokens
  assert s.get("a").tokens == [5, 6, 7, 8, 9, 10]
  assert s.finish("a") and not s.finish("a")
  assert s.num_running == 0 and s.pool.num_free == s.pool.capacity
  assert s.schedule_decode() is None
  s.check()


def test_length_limit_is_capped_by_the_model():
  s = Scheduler(config())
  s.add("a", [1] * 30, 100)
  run_prefills(s)  # 31 tokens
  assert s.append_token("a", 1) is True  # 32 = max_seq_len


def test_cancel_waiting_and_running():
  s = Scheduler(config(decode_batch=1))
  s.add("a", [1], 4)
  s.add("b", [1], 4)
  run_prefills(s)
  assert s.get("a").state is State.RUNNING and s.get("b").state is State.WAITING
  assert s.finish("b") and s.num_waiting == 0
  assert s.finish("a") and s.pool.num_used == 0
  s.check()


def test_preemption_takes_the_youngest_and_recomputes_it_whole():
  # 6 usable pages of 4 tokens; 8-token prompts (+1) take 3 pages each.
  s = Scheduler(config(num_pages=7, decode_batch=2, max_prefill_batches_per_step=2))
  s.add("old", [1] * 8, 12)
  s.add("young", [2] * 8, 12)
  assert [len(b.rows) for b in run_prefills(s)] == [2]  # both in one bucket-8 batch
  assert s.pool.num_free == 0
  for _ in range(4):  # writes positions 8..11: still within 3 pages
    d = s.schedule_decode()
    assert d.preempted == () and len(d.rows) == 2
    for r in d.rows:
      s.append_token(r.seq_id, 3)
  d = s.schedule_decode()  # position 12 needs a 4th page
  assert d.preempted == ("young",)
  assert [r.seq_id for r in d.rows] == ["old"] and d.rows[0].position == 12
  young = s.get("young")
  assert young.state is State.WAITING and young.preemptions == 1 and s.num_preemptions == 1
  assert s.pool.table("young") == []
  s.check()
  # When "old" finishes, "young" is readmitted with its generated tokens to recompute.
  s.finish("old")
  (batch,) = s.schedule_prefill()
  (row,) = batch.rows
  assert row.seq_id == "young" and list(row.tokens) == young.tokens
  assert len(row.tokens) == 13 and row.num_generated == 5 and batch.bucket.length == 16
  s.check()


def test_preempting_itself_when_it_is_the_youngest():
  s = Scheduler(config(num_pages=7, decode_batch=2, max_prefill_batches_per_step=2))
  s.add("old", [1] * 8, 12)
  s.add("young", [2] * 11, 12)  # 12 tokens after prefill: 3 pages, at the edge
  run_prefills(s)
  assert s.pool.num_free == 0
  d = s.schedule_decode()
  # "old" (9 tokens) fits its 3 pages, "young" (12) fits; next step young needs a 4th.
  for r in d.rows:
    s.append_token(r.seq_id, 3)
  d = s.schedule_decode()
  assert d.preempted == ("young",) and [r.seq_id for r in d.rows] == ["old"]


def test_watermark_holds_back_admission_while_others_run():
  s = Scheduler(config(num_pages=9, watermark_pages=4))  # 8 usable
  s.add("a", [1] * 7, 4)  # 2 pages (prompt + 1), nothing runs: admitted
  s.add("b", [1] * 7, 4)  # 2 pages would leave 4: admitted
  s.add("c", [1] * 7, 4)  # 2 pages would leave 2 < 4: waits
  assert [r.seq_id for r in run_prefills(s)[0].rows] == ["a", "b"]
  assert run_prefills(s) == [] and s.num_waiting == 1
  s.finish("a")
  assert [r.seq_id for r in run_prefills(s)[0].rows] == ["c"]


def test_static_batching_admits_only_when_idle():
  s = Scheduler(config(static_batching=True, decode_batch=2))
  for i in range(3):
    s.add(i, [1] * 3, 2)
  assert sum(len(b.rows) for b in run_prefills(s)) == 2
  s.add(9, [1], 1)
  assert run_prefills(s) == []
  s.finish(0)
  assert run_prefills(s) == []  # 1 still running
  s.finish(1)
  assert [r.seq_id for b in run_prefills(s) for r in b.rows] == [2, 9]


@pytest.mark.parametrize("static", [False, True])
def test_simulation_thousands_of_requests_never_leak(static):
  """Random prompts, lengths, arrivals and cancellations; every page comes back."""
  rng = random.Random(1234 + static)
  cfg = config(num_pages=25, decode_batch=6, max_waiting=10_000, static_batching=static,
               max_prefill_batches_per_step=2, max_seq_len=32)
  s = Scheduler(cfg)
  expected: dict[int, int] = {}  # seq -> max_len
  done = cancelled = refused = 0
  next_id = 0
  total = 2500
  steps = 0
  while done + cancelled + refused < total:
    steps += 1
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
      if next_id < total:
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 31))]
        max_new = rng.randint(1, 40)
        try:
          seq = s.add(next_id, prompt, max_new)
          expected[next_id] = seq.max_len
        except ServingError as e:
          assert e.code is Code.RESOURCE_EXHAUSTED
          refused += 1
        next_id += 1
    for b in s.schedule_prefill():
      assert len(b.rows) <= b.bucket.batch
      for r in b.rows:
        assert len(r.tokens) <= b.bucket.length
        assert 0 not in r.pages
        if s.append_token(r.seq_id, 1):
          s.finish(r.seq_id)
          done += 1
    d = s.schedule_decode()
    if d is not None:
      assert len({r.slot for r in d.rows}) == len(d.rows) <= cfg.decode_batch
      used = [p for r in d.rows for p in r.pages]
      assert len(used) == len(set(used)) and 0 not in used
      for r in d.rows:
        assert len(r.pages) * cfg.page_size > r.position  # the write position has a page
        if s.append_token(r.seq_id, 2):
          assert len(s.get(r.seq_id).tokens) == expected[r.seq_id]
          s.finish(r.seq_id)
          done += 1
    live = list(expected)
    if rng.random() < 0.15:
      victim = rng.choice(live) if live else None
      if victim is not None and s.finish(victim):
        cancelled += 1
    for k in [k for k in expected if s.get(k) is None]:
      del expected[k]
    s.check()
    assert steps < 200_000
  assert s.num_running == s.num_waiting == 0
  assert s.pool.num_free == s.pool.capacity and s.pool.owners() == []
  assert done > 1000 and cancelled > 100
  if not static:
    assert s.num_preemptions > 0  # the pool is small enough to force recomputation
