"""Continuous batching over a paged KV cache: plain-Python decisions, no tensors, no JAX.

The service loop asks, every iteration:
  1. `schedule_prefill()`: which waiting sequences to admit now. Each admitted sequence gets a
     free decode slot and pages for its tokens plus the next one; admissions are grouped into
     prefill batches of one length bucket. The head of the queue always goes first (if it
     does not fit, nothing is admitted, so nothing starves); later arrivals that fit its
     bucket fill the rest of its batch.
  2. `schedule_decode()`: one decode row per running sequence. A sequence whose next token
     needs a page that is not free preempts the youngest running sequence (its pages are freed;
     it goes back to the front of the queue and is recomputed by a later prefill) until it fits.
After executing each decision the caller reports tokens with `append_token` and retires
sequences with `finish` (finished, cancelled or failed: all free their slot and pages at once).

A request that could never fit (prompt longer than the model, or more pages than the pool) is
refused at `add` with INVALID_ARGUMENT / RESOURCE_EXHAUSTED, as is one arriving to a full queue.
`static_batching=True` admits only when nothing runs (a whole batch finishes first), for
comparison benchmarks.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import enum
import heapq
import itertools
import logging
from typing import Hashable, Sequence

from serving.generation.pages import PagePool, pages_for
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillBucket:
  """One compiled prefill shape: `batch` rows of `length` tokens."""

  length: int
  batch: int


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
  """Shapes the engine compiled plus admission policy.

  The largest prefill bucket must hold `max_seq_len` tokens: a preempted sequence is
  recomputed whole. `watermark_pages` stay free after an admission while anything runs.
  """

  decode_batch: int
  page_size: int
  num_pages: int
  max_seq_len: int
  prefill_buckets: tuple[PrefillBucket, ...]
  reserved_pages: tuple[int, ...] = (0,)
  max_waiting: int = 1024
  max_prefill_batches_per_step: int = 1
  watermark_pages: int = 0
  static_batching: bool = False

  def __post_init__(self):
    lengths = [b.length for b in self.prefill_buckets]
    if not lengths or lengths != sorted(set(lengths)):
      raise ValueError(f"prefill bucket lengths must be strictly increasing, got {lengths}")
    if min(b.batch for b in self.prefill_buckets) < 1:
      raise ValueError(f"prefill bucket batches must be >= 1: {self.prefill_buckets}")
    if lengths[-1] < self.max_seq_len:
      raise ValueError(f"largest prefill bucket {lengths[-1]} < max_seq_len={self.max_seq_len}")
    for f in ("decode_batch", "page_size", "max_seq_len", "max_waiting",
              "max_prefill_batches_per_step"):
      if getattr(self, f) < 1:
        raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
    if self.watermark_pages < 0:
      raise ValueError(f"watermark_pages={self.watermark_pages} must be >= 0")

  @property
  def pages_per_seq(self) -> int:
    return pages_for(self.max_seq_len, self.page_size)

  @property
  def usable_pages(self) -> int:
    return self.num_pages - len(set(self.reserved_pages))

  def check(self, prompt_len: int, max_new_tokens: int) -> None:
    """Raises ServingError unless such a request can ever run."""
    if prompt_len < 1:
      raise ServingError(Code.INVALID_ARGUMENT, "the prompt is empty")
    if prompt_len >= self.max_seq_len:
      raise ServingError(
          Code.INVALID_ARGUMENT,
          f"prompt of {prompt_len} tokens leaves no room to generate: the model holds"
          f" {self.max_seq_len} tokens; shorten the prompt")
    need = pages_for(min(prompt_len + max_new_tokens, self.max_seq_len), self.page_size)
    if need > self.usable_pages:
      raise ServingError(
          Code.RESOURCE_EXHAUSTED,
          f"the request needs {need} KV pages, the cache has {self.usable_pages};"
          " lower max_new_tokens or the prompt length")


class State(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass(slots=True, eq=False)
class Seq:
  """A request's tokens (prompt + generated) and where it is; owned by the scheduler."""

  seq_id: Hashable
  tokens: list[int]
  prompt_len: int
  max_len: int  # stop after this many tokens (prompt + max_new_tokens, capped by the model)
  arrival: int
  state: State = State.WAITING
  slot: int | None = None
  preemptions: int = 0
  admitted: bool = False  # ever admitted (a preempted sequence stays True)

  @property
  def num_generated(self) -> int:
    return len(self.tokens) - self.prompt_len


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillRow:
  """Prefill `tokens` (all of them: a preempted sequence recomputes its generated ones too)."""

  seq_id: Hashable
  slot: int
  tokens: tuple[int, ...]
  pages: tuple[int, ...]
  num_generated: int


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillBatch:
  bucket: PrefillBucket
  rows: tuple[PrefillRow, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeRow:
  """Feed `token` at `position` (attending to position + 1 tokens) in decode slot `slot`;
  with speculative decoding, `draft` tokens after it (positions position + 1 ..) to verify,
  `room` of them at most (its pages hold them; a draft model fills `draft` up to it)."""

  seq_id: Hashable
  slot: int
  token: int
  position: int
  pages: tuple[int, ...]
  num_generated: int
  draft: tuple[int, ...] = ()
  room: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBatch:
  rows: tuple[DecodeRow, ...]
  preempted: tuple[Hashable, ...]


class Scheduler:
  """Waiting queue, decode slots and the page pool; every method is O(batch) or O(queue head)."""

  def __init__(self, config: SchedulerConfig):
    self.config = config
    self.pool = PagePool(config.num_pages, config.page_size, reserved=config.reserved_pages)
    self._lengths = [b.length for b in config.prefill_buckets]
    self._seqs: dict[Hashable, Seq] = {}
    self._waiting: collections.deque[Seq] = collections.deque()
    self._running: list[Seq] = []  # admission order: the last is the youngest
    self._free_slots = list(range(config.decode_batch))
    self._arrivals = itertools.count()
    self.num_preemptions = 0

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  def get(self, seq_id: Hashable) -> Seq | None:
    return self._seqs.get(seq_id)

  def running_ids(self) -> list[Hashable]:
    return [s.seq_id for s in self._running]

  def add(self, seq_id: Hashable, prompt: Sequence[int], max_new_tokens: int) -> Seq:
    """Queues a request; raises ServingError if it can never run or the queue is full."""
    self.config.check(len(prompt), max_new_tokens)
    if seq_id in self._seqs:
      raise ServingError(Code.INVALID_ARGUMENT, f"request id {seq_id!r} is already live")
    if len(self._waiting) >= self.config.max_waiting:
      raise ServingError(Code.RESOURCE_EXHAUSTED,
                         f"{len(self._waiting)} requests are already waiting; retry later")
    seq = Seq(seq_id, list(prompt), len(prompt),
                    min(len(prompt) + max_new_tokens, self.config.max_seq_len),
                    next(self._arrivals))
    self._seqs[seq_id] = seq
    self._waiting.append(seq)
    return seq

  def append_token(self, seq_id: Hashable, token: int) -> bool:
    """Records a generated token; True when the sequence reached its length limit."""
    seq = self._seqs[seq_id]
    if seq.state is not State.RUNNING:
      raise ValueError(f"{seq_id!r} is {seq.state.value}, not running")
    seq.tokens.append(int(token))
    return len(seq.tokens) >= seq.max_len

  def finish(self, seq_id: Hashable) -> bool:
    """Retires a sequence (done, cancelled or failed): frees its slot and pages now."""
    seq = self._seqs.pop(seq_id, None)
    if seq is None:
      return False
    if seq.state is State.WAITING:
      self._waiting.remove(seq)
    elif seq.state is State.RUNNING:
      self._evict(seq)
    seq.state = State.FINISHED
    return True

  def _evict(self, seq: Seq) -> None:
    self._running.remove(seq)
    self.pool.release(seq.seq_id)
    heapq.heappush(self._free_slots, seq.slot)
    seq.slot = None

  def _bucket(self, num_tokens: int) -> PrefillBucket:
    return self.config.prefill_buckets[bisect.bisect_left(self._lengths, num_tokens)]

  def _admit(self, seq: Seq, reserve: int) -> PrefillRow | None:
    """Gives `seq` a slot and pages for its tokens + 1, keeping `reserve` pages free."""
    need = pages_for(len(seq.tokens) + 1, self.config.page_size)
    if not self._free_slots or self.pool.num_free - need < reserve:
      return None
    if not self.pool.reserve(seq.seq_id, len(seq.tokens) + 1):
      return None
    self._waiting.remove(seq)
    seq.state, seq.slot, seq.admitted = State.RUNNING, heapq.heappop(self._free_slots), True
    self._running.append(seq)
    return PrefillRow(seq.seq_id, seq.slot, tuple(seq.tokens), tuple(self.pool.table(seq.seq_id)),
                      seq.num_generated)

  def schedule_prefill(self) -> list[PrefillBatch]:
    """Admits waiting sequences into free slots, grouped by prefill bucket (see module doc)."""
    cfg = self.config
    if cfg.static_batching and self._running:
      return []
    max_batches = cfg.decode_batch if cfg.static_batching else cfg.max_prefill_batches_per_step
    batches: list[PrefillBatch] = []
    while self._waiting and self._free_slots and len(batches) < max_batches:
      head = self._waiting[0]
      bucket = self._bucket(len(head.tokens))
      # Nothing running: the head must go in, whatever the watermark (it always fits alone).
      reserve = cfg.watermark_pages if self._running else 0
      first = self._admit(head, reserve)
      if first is None:
        break
      rows = [first]
      for seq in list(itertools.islice(self._waiting, 0, 4 * bucket.batch)):
        if len(rows) == bucket.batch or not self._free_slots:
          break
        if len(seq.tokens) <= bucket.length and (row := self._admit(seq, cfg.watermark_pages)):
          rows.append(row)
      batches.append(PrefillBatch(bucket, tuple(rows)))
    return batches

  def schedule_decode(self) -> DecodeBatch | None:
    """One row per running sequence; preempts the youngest while a page is missing."""
    preempted = []
    for seq in list(self._running):  # oldest first
      if seq.state is not State.RUNNING:
        continue  # preempted by an older one in this loop
      while not self.pool.reserve(seq.seq_id, len(seq.tokens)):
        victim = self._running[-1]
        self._preempt(victim)
        preempted.append(victim.seq_id)
        if victim is seq:
          break
    if not self._running:
      return None
    rows = tuple(
        DecodeRow(s.seq_id, s.slot, s.tokens[-1], len(s.tokens) - 1,
                  tuple(self.pool.table(s.seq_id)), s.num_generated)
        for s in self._running)
    return DecodeBatch(rows, tuple(preempted))

  def _preempt(self, seq: Seq) -> None:
    self._evict(seq)
    seq.state = State.WAITING
    seq.preemptions += 1
    self.num_preemptions += 1
    self._waiting.appendleft(seq)
    logger.debug("preempted %r at %d tokens", seq.seq_id, len(seq.tokens))

  def check(self) -> None:
    """Raises AssertionError if slots, pages and states disagree (tests call it after every step)."""
    self.pool.check()
    slots = [s.slot for s in self._running]
    if len(set(slots)) != len(slots) or set(slots) & set(self._free_slots):
      raise AssertionError(f"slots reused: running {slots}, free {self._free_slots}")
    if len(slots) + len(self._free_slots) != self.config.decode_batch:
      raise AssertionError("a decode slot leaked")
    owners = set(self.pool.owners())
    if owners != {s.seq_id for s in self._running}:
      raise AssertionError(f"pages owned by {owners - {s.seq_id for s in self._running}}"
                           " which are not running")
    if len(self._seqs) != len(self._running) + len(self._waiting):
      raise AssertionError("a sequence is neither waiting nor running")
