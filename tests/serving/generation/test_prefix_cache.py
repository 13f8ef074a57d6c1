"""Prefix-caching page pool and the chunked scheduler, worked by hand and simulated, without JAX."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from serving.generation.chunking import ChunkConfig, ChunkedScheduler
from serving.generation.prefix_cache import PrefixCachePool, block_hash
from serving.generation.scheduler import PrefillBucket, SchedulerConfig

PS = 4


def test_imports_without_jax():
  code = ("import sys; import serving.generation.chunking, serving.generation.prefix_cache;"
          " assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_block_hash_chains_the_whole_prefix():
  a = block_hash(b"", [1, 2, 3, 4])
  assert a == block_hash(b"", [1, 2, 3, 4]) and a != block_hash(b"", [1, 2, 3, 5])
  # The same page after a different first page has a different key.
  assert block_hash(a, [9, 9, 9, 9]) != block_hash(block_hash(b"", [0, 2, 3, 4]), [9, 9, 9, 9])


def test_full_pages_are_shared_and_the_last_token_is_always_recomputed():
  pool = PrefixCachePool(12, PS)
  prompt = list(range(10))  # pages [0..3] [4..7] full, [8, 9] partial
  assert pool.allocate("a", prompt, 11) == 0
  pool.commit("a", prompt, 10)  # only the two full pages get keys
  assert pool.num_cached == 2
  assert pool.allocate("b", prompt[:9] + [99], 11) == 8  # shares both full pages
  assert pool.table("b")[:2] == pool.table("a")[:2]
  assert pool.table("b")[2] != pool.table("a")[2]  # the divergent page is its own
  # A prompt of exactly two full pages shares one: its last token must be computed.
  assert pool.allocate("c", prompt[:8], 9) == 4
  assert pool.table("c")[0] == pool.table("a")[0] and pool.table("c")[1] != pool.table("a")[1]
  # A different first page shares nothing, even if later pages are equal.
  assert pool.allocate("d", [7] + prompt[1:], 11) == 0
  assert (pool.hit_tokens, pool.queried_tokens) == (12, 38)
  pool.check()
  for owner in "abcd":
    pool.release(owner)
  pool.check()
  assert pool.num_used == 0 and pool.num_free == pool.capacity and pool.num_cached == 2


def test_a_referenced_page_is_never_evicted_or_freed():
  pool = PrefixCachePool(5, PS)  # 4 usable pages
  shared = [1] * 8 + [2]
  pool.allocate("a", shared, 10)  # 3 pages
  pool.commit("a", shared, 9)
  assert pool.allocate("b", shared, 10) == 8  # shares 2, takes the last free page
  pool.release("a")  # a's private page is free again; the shared ones stay referenced by b
  pool.check()
  assert pool.num_free == 1
  assert pool.allocate("c", [5] * 9, 10) is None  # needs 3 pages: refused, nothing changes
  pool.check()
  assert pool.reserve("c", 4) and not pool.reserve("d", 1)
  assert set(pool.table("c")).isdisjoint(pool.table("b"))
  pool.check()


def test_unreferenced_cached_pages_are_evicted_least_recently_released_first():
  pool = PrefixCachePool(5, PS)
  for owner, tok in (("x", 1), ("y", 2)):
    prompt = [tok] * 5
    pool.allocate(owner, prompt, 6)
    pool.commit(owner, prompt, 5)
  pool.release("y")  # y's keyed page released first: least recently used
  pool.release("x")
  assert pool.num_cached == 2 and pool.num_free == 4
  pool.allocate("z", [3] * 9, 10)  # 3 pages: the 2 free ones, then evicts y's
  assert pool.evictions == 1
  assert pool.allocate("x2", [1] * 5, 6) is None  # 1 page left, x2 shares x's and needs 1 more
  pool.check()
  pool.release("z")
  assert pool.allocate("x2", [1] * 5, 6) == 4  # x's page survived
  assert pool.allocate("y2", [2] * 5, 6) == 0  # y's did not
  pool.check()


def test_clear_cache_forgets_every_key():
  pool = PrefixCachePool(6, PS)
  pool.allocate("a", [1] * 9, 10)
  pool.commit("a", [1] * 9, 9)
  pool.clear_cache()
  pool.check()
  pool.release("a")
  assert pool.num_cached == 0 and pool.allocate("b", [1] * 9, 10) == 0
  pool.check()


def scheduler(**kw) -> ChunkedScheduler:
  chunk = ChunkConfig((PrefillBucket(4, 2), PrefillBucket(8, 1)),
                      kw.pop("budget", 10), kw.pop("caching", True))
  base = dict(decode_batch=4, page_size=PS, num_pages=25, max_seq_len=40,
              prefill_buckets=(PrefillBucket(40, 1),))
  return ChunkedScheduler(SchedulerConfig(**{**base, **kw}), chunk)


def run(s: ChunkedScheduler, next_token=lambda seq: 7):
  """Executes one step as the service would; returns it."""
  step = s.schedule()
  for b in step.chunks:
    for r in b.rows:
      s.chunk_done(r)
      if r.last:
        s.append_token(r.seq_id, next_token(s.get(r.seq_id).tokens))
  if step.decode:
    for r in step.decode.rows:
      s.append_token(r.seq_id, next_token(s.get(r.seq_id).tokens))
  s.check()
  return step


def test_a_long_prompt_advances_a_chunk_per_step_beside_decodes():
  s = scheduler(budget=8)
  s.add("short", [1, 2], 30)
  run(s)  # its whole prefill in one chunk
  s.add("long", list(range(30)), 4)
  steps = [run(s) for _ in range(6)]
  assert [st.num_tokens for st in steps[:5]] == [8, 8, 8, 8, 3]
  for st in steps[:5]:
    assert [r.seq_id for r in st.decode.rows] == ["short"]
  chunks = [(r.start, len(r.tokens)) for st in steps for b in st.chunks for r in b.rows]
  # 7 tokens a step: the budget less the running decode; then "long" decodes too.
  assert chunks == [(0, 7), (7, 7), (14, 7), (21, 7), (28, 2)]
  assert [r.seq_id for r in steps[5].decode.rows] == ["short", "long"]


def test_a_cached_prefix_starts_at_the_first_uncached_token():
  s = scheduler(budget=12)
  instruction = list(range(100, 112))  # three full pages
  s.add("a", instruction + [1, 2], 2)
  while s.get("a").num_generated == 0:
    run(s)
  s.finish("a")
  s.add("b", instruction + [3], 2)
  first = run(s).chunks[0].rows[0]
  assert (first.start, first.tokens, first.last) == (12, (3,), True)
  s.add("c", instruction, 2)  # all three pages cached: the last page is recomputed
  (row,) = run(s).chunks[0].rows
  assert row.start == 8 and row.tokens == tuple(instruction[8:])
  assert s.pool.hit_tokens == 12 + 8


@pytest.mark.parametrize("caching", [True, False])
def test_thousands_of_random_requests_with_cancels_free_every_page(caching):
  rng = random.Random(5)
  s = scheduler(num_pages=21, budget=9, caching=caching)
  prefixes = [[rng.randrange(50) for _ in range(rng.randint(4, 20))] for _ in range(5)]
  live, n = [], 0
  contents: dict[int, int] = {}  # page -> key it holds while referenced by anyone
  while n < 2000 or live:
    if n < 2000 and rng.random() < 0.5:
      prompt = rng.choice(prefixes)[:rng.randint(1, 20)] + [rng.randrange(50)
                                                           for _ in range(rng.randint(0, 6))]
      prompt = prompt[:38] or [1]
      s.add(n, prompt, rng.randint(1, 39 - len(prompt)))
      live.append(n)
      n += 1
    if live and rng.random() < 0.1:
      victim = live.pop(rng.randrange(len(live)))
      s.finish(victim)
    run(s)
    for sid in list(live):
      seq = s.get(sid)
      if len(seq.tokens) >= seq.max_len:
        s.finish(sid)
        live.remove(sid)
    # A page shared by two live sequences must hold the same tokens for both.
    contents.clear()
    for sid in s.running_ids():
      toks, table = s.get(sid).tokens, s.pool.table(sid)
      for i, page in enumerate(table[:len(toks) // PS]):
        key = hash(tuple(toks[:(i + 1) * PS]))
        assert contents.setdefault(page, key) == key, f"page {page} shared by different prefixes"
  assert s.num_running == s.num_waiting == 0
  assert s.pool.num_used == 0 and s.pool.num_free == s.pool.capacity
  s.check()
  if caching:
    assert s.pool.hit_tokens > 1000 and s.pool.evictions > 0
  else:
    assert s.pool.hit_tokens == 0 and s.pool.num_cached == 0
  assert s.num_preemptions > 0


def test_config_validation():
  with pytest.raises(ValueError, match="strictly increasing"):
    ChunkConfig((PrefillBucket(8, 1), PrefillBucket(4, 1)), 16)
  with pytest.raises(ValueError, match="decode_batch"):
    scheduler(budget=3)
