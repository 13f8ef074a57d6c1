"""Chunked prefill under a per-step token budget, over a prefix-caching page pool (no JAX).

Every service step runs one decode row per sequence that has finished its prefill, then spends
what is left of `max_num_batched_tokens` (vLLM's name) on prefill chunks: first the sequences
already part-way through their prompt (admission order), then new admissions from the head of
the queue. So a long prompt advances a chunk per step beside the running decodes instead of
stalling them for a whole prefill. Chunks run through the bundle's `extend_<C>` shapes (a chunk
of n tokens uses the smallest bucket C >= n; at most the largest C per row per step), so no
shape is ever new after warm-up.

An admitted sequence gets a decode slot and pages for its tokens + 1 at once; with prefix
caching its leading full pages may already be cached (serving/generation/prefix_cache.py), and
its first chunk starts at the first uncached token. The last chunk's sampled token is the
sequence's next token; from the following step it decodes. Preemption is the base scheduler's
(youngest running first, prefilling or not); a preempted sequence is recomputed from the
cache's longest prefix that survived.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from typing import Any, Hashable, Iterator

from serving.generation.pages import pages_for
from serving.generation.prefix_cache import PrefixCachePool
from serving.generation.scheduler import (DecodeBatch, DecodeRow, PrefillBucket, Scheduler,
                                          SchedulerConfig, Seq, State)


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkConfig:
  """The extend shapes, the per-step token budget (decode rows + chunk tokens), caching."""

  buckets: tuple[PrefillBucket, ...]
  max_num_batched_tokens: int
  prefix_caching: bool = True

  def __post_init__(self):
    lengths = [b.length for b in self.buckets]
    if not lengths or lengths != sorted(set(lengths)) or lengths[0] < 1:
      raise ValueError(f"chunk bucket lengths must be positive and strictly increasing, got"
                       f" {lengths}")
    if min(b.batch for b in self.buckets) < 1:
      raise ValueError(f"chunk bucket batches must be >= 1: {self.buckets}")
    if self.max_num_batched_tokens < 1:
      raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkRow:
  """Prefill `tokens` at positions start.. of `seq_id`; `last`: the chunk ends its prefill,
  so the token sampled after it is the sequence's next token."""

  seq_id: Hashable
  slot: int
  tokens: tuple[int, ...]
  start: int
  pages: tuple[int, ...]
  num_generated: int
  last: bool


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkBatch:
  bucket: PrefillBucket
  rows: tuple[ChunkRow, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
  """One service step: chunk batches (run first), then the decode batch (or None)."""

  chunks: tuple[ChunkBatch, ...]
  decode: DecodeBatch | None

  @property
  def num_tokens(self) -> int:
    """Tokens this step computes: chunk tokens plus one per decode row."""
    return (sum(len(r.tokens) for b in self.chunks for r in b.rows)
            + (len(self.decode.rows) if self.decode else 0))


class ChunkedScheduler(Scheduler):
  """Scheduler whose prefill is chunked under a token budget and whose pages are shared."""

  def __init__(self, config: SchedulerConfig, chunk: ChunkConfig):
    super().__init__(config)
    if chunk.max_num_batched_tokens < config.decode_batch:
      raise ValueError(f"max_num_batched_tokens={chunk.max_num_batched_tokens} must be >="
                       f" decode_batch={config.decode_batch}, or prefill could stall")
    self.chunk = chunk
    self.pool = PrefixCachePool(config.num_pages, config.page_size,
                                reserved=config.reserved_pages, caching=chunk.prefix_caching)
    self._chunk_lengths = [b.length for b in chunk.buckets]
    self._computed: dict[Hashable, int] = {}  # running: tokens whose K/V are in the cache
    self._decoding: set[Hashable] = set()  # running and past their prefill

  def schedule(self) -> Step:
    """Decode rows for every decoding sequence, then chunks within the budget left."""
    decode = self._schedule_decode_rows()
    budget = self.chunk.max_num_batched_tokens - (len(decode.rows) if decode else 0)
    return Step(tuple(self._schedule_chunks(budget)), decode)

  def chunk_done(self, row: ChunkRow) -> None:
    """Records that `row` ran: its tokens are in the cache (full pages become shareable)."""
    seq = self._seqs[row.seq_id]
    done = row.start + len(row.tokens)
    self._computed[row.seq_id] = done
    self.pool.commit(row.seq_id, seq.tokens, done)
    if row.last:
      self._decoding.add(row.seq_id)

  def append_token(self, seq_id: Hashable, token: int) -> bool:
    seq = self._seqs[seq_id]
    if seq.state is State.RUNNING:  # every token so far was fed, so its K/V are cached
      self._computed[seq_id] = len(seq.tokens)
      self.pool.commit(seq_id, seq.tokens, len(seq.tokens))
    return super().append_token(seq_id, token)

  def clear_cache(self) -> None:
    """Forgets every cached prefix (the engine's cache was reset)."""
    self.pool.clear_cache()

  def _evict(self, seq: Seq) -> None:
    super()._evict(seq)
    self._computed.pop(seq.seq_id, None)
    self._decoding.discard(seq.seq_id)

  def _schedule_decode_rows(self) -> DecodeBatch | None:
    """One row per decoding sequence; preempts the youngest while a page is missing."""
    preempted = []
    for seq in list(self._running):  # oldest first
      if seq.state is not State.RUNNING or seq.seq_id not in self._decoding:
        continue
      while not self.pool.reserve(seq.seq_id, len(seq.tokens)):
        victim = self._running[-1]
        self._preempt(victim)
        preempted.append(victim.seq_id)
        if victim is seq:
          break
    rows = tuple(DecodeRow(s.seq_id, s.slot, s.tokens[-1], len(s.tokens) - 1,
                           tuple(self.pool.table(s.seq_id)), s.num_generated)
                 for s in self._running if s.seq_id in self._decoding)
    return DecodeBatch(rows, tuple(preempted)) if rows else None

  def _chunk_bucket(self, num_tokens: int) -> PrefillBucket:
    i = bisect.bisect_left(self._chunk_lengths, num_tokens)
    return self.chunk.buckets[min(i, len(self.chunk.buckets) - 1)]

  def _schedule_chunks(self, budget: int) -> list[ChunkBatch]:
    """Chunk batches of one bucket each, the first candidate choosing it, within `budget`."""
    batches: list[ChunkBatch] = []
    taken: set[Hashable] = set()
    while budget > 0 and len(batches) < self.config.max_prefill_batches_per_step:
      rows: list[ChunkRow] = []
      bucket = None
      for seq in self._candidates(taken):
        left = len(seq.tokens) - self._computed[seq.seq_id]
        bucket = bucket or self._chunk_bucket(min(left, budget))
        n = min(left, bucket.length, budget)
        start = self._computed[seq.seq_id]
        rows.append(ChunkRow(seq.seq_id, seq.slot, tuple(seq.tokens[start:start + n]), start,
                             tuple(self.pool.table(seq.seq_id)), seq.num_generated,
                             start + n == len(seq.tokens)))
        taken.add(seq.seq_id)
        budget -= n
        if len(rows) == bucket.batch or budget == 0:
          break
      if not rows:
        break
      batches.append(ChunkBatch(bucket, tuple(rows)))
    return batches

  def _candidates(self, taken: set[Hashable]) -> Iterator[Seq]:
    """Prefilling sequences in admission order, then the queue head, admitted one at a time."""
    for seq in list(self._running):
      if seq.seq_id not in self._decoding and seq.seq_id not in taken:
        yield seq
    while self._waiting and self._free_slots:
      head = self._waiting[0]
      if not self._admit_chunked(head, self.config.watermark_pages if self._running else 0):
        return
      yield head

  def _admit_chunked(self, seq: Seq, reserve: int) -> bool:
    """Slot + pages for tokens + 1, the cached prefix shared; keeps `reserve` pages free."""
    need = len(seq.tokens) + 1
    if self.pool.num_free - pages_for(need, self.config.page_size) < reserve:
      return False
    cached = self.pool.allocate(seq.seq_id, seq.tokens, need)
    if cached is None:
      return False
    self._waiting.popleft()
    seq.state, seq.slot, seq.admitted = State.RUNNING, heapq.heappop(self._free_slots), True
    self._running.append(seq)
    self._computed[seq.seq_id] = cached
    return True

  def check(self) -> None:
    super().check()
    running = {s.seq_id for s in self._running}
    if set(self._computed) != running or not self._decoding <= running:
      raise AssertionError("prefill progress kept for sequences that are not running")
    for s in self._running:
      if not 0 <= self._computed[s.seq_id] <= len(s.tokens):
        raise AssertionError(f"{s.seq_id!r}: {self._computed[s.seq_id]} tokens computed of"
                             f" {len(s.tokens)}")


def chunk_config(spec: Any, service: Any) -> ChunkConfig | None:
  """The ChunkConfig a service config asks of a GenerateSpec; None for whole prefills (the
  bundle has no extend signatures, chunking is off, or batching is static)."""
  if not spec.extend_buckets or not service.chunked_prefill or service.static_batching:
    return None
  budget = service.max_num_batched_tokens
  if budget is None:
    budget = spec.decode_batch + spec.extend_buckets[-1].length
  return ChunkConfig(spec.extend_buckets, budget, service.prefix_caching)
