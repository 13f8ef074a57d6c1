"""Speculative decoding's scheduling: draft tokens on the decode rows, pages for them (no JAX).

Each step, every decoding sequence gets up to `num_tokens` draft tokens (n-gram prompt lookup,
serving/generation/ngram.py) on its decode row; the engine's verify pass (a `verify_<C>`
signature) feeds [last token, drafts] in one target forward and emits 1..n + 1 tokens per row
(the accepted drafts and one token of the target's, by the rejection rule of spec_sampling.py).

Pages: a row with n drafts writes K/V at positions len - 1 .. len - 1 + n, so its table grows to
hold len + n tokens before the step; if that does not fit it runs without drafts, and only
then preempts (as plain decoding would). Rejected drafts' K/V lie past the accepted length:
attention is bounded by each row's length and the next step overwrites them, and they are never
in a page the prefix cache shares (only full pages of committed tokens are keyed, and a draft
never lies in one). Pages held for drafts that were rejected are freed at the next schedule.
Drafts never run past a sequence's length limit, so max_tokens ends it exactly as without.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable

from bundle import BundleError
from serving.generation.chunking import ChunkConfig, ChunkedScheduler
from serving.generation.ngram import ngram_propose
from serving.generation.scheduler import (DecodeBatch, DecodeRow, PrefillBucket, SchedulerConfig,
                                          Seq, State)

METHODS = ("ngram", "draft")  # prompt lookup here; a draft LM (draft_model.py) in the service


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculativeConfig:
  """Draft method and length: `num_tokens` drafts per row per step (K), n-gram sizes tried."""

  method: str = "ngram"
  num_tokens: int = 4
  ngram_max: int = 3
  ngram_min: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"speculative method {self.method!r} must be one of {METHODS}")
    if self.num_tokens < 1:
      raise ValueError(f"num_tokens={self.num_tokens} must be >= 1")
    if not 1 <= self.ngram_min <= self.ngram_max:
      raise ValueError(f"need 1 <= ngram_min={self.ngram_min} <= ngram_max={self.ngram_max}")


class SpeculativeScheduler(ChunkedScheduler):
  """ChunkedScheduler whose decode rows carry draft tokens."""

  def __init__(self, config: SchedulerConfig, chunk: ChunkConfig, spec: SpeculativeConfig):
    super().__init__(config, chunk)
    self.spec = spec

  def draft(self, seq: Seq) -> tuple[list[int], int]:
    """(n-gram drafts, room) for `seq`'s next tokens: room is how many drafts it may verify,
    never past its length limit (the last token emitted is always the target's own); a draft
    model's drafts come later, so they are [] here."""
    room = max(0, min(self.spec.num_tokens, seq.max_len - len(seq.tokens) - 1))
    if self.spec.method != "ngram" or room == 0:
      return [], room
    d = ngram_propose(seq.tokens, room, max_n=self.spec.ngram_max, min_n=self.spec.ngram_min)
    return d, len(d)

  def _schedule_decode_rows(self) -> DecodeBatch | None:
    """As ChunkedScheduler's, with drafts where their pages fit (see the module doc)."""
    preempted, drafts = [], {}
    for seq in list(self._running):  # oldest first
      if seq.state is not State.RUNNING or seq.seq_id not in self._decoding:
        continue
      d, room = self.draft(seq)
      self.pool.shrink(seq.seq_id, len(seq.tokens) + room)  # rejected drafts' pages
      if room and not self.pool.reserve(seq.seq_id, len(seq.tokens) + room):
        d, room = [], 0
      while not self.pool.reserve(seq.seq_id, len(seq.tokens)):
        victim = self._running[-1]
        self._preempt(victim)
        preempted.append(victim.seq_id)
        if victim is seq:
          break
      drafts[seq.seq_id] = (tuple(d), room)
    rows = tuple(self._row(s, drafts) for s in self._running if s.seq_id in self._decoding)
    return DecodeBatch(rows, tuple(preempted)) if rows else None

  def _row(self, s: Seq, drafts: dict[Hashable, tuple[tuple[int, ...], int]]) -> DecodeRow:
    return DecodeRow(s.seq_id, s.slot, s.tokens[-1], len(s.tokens) - 1,
                     tuple(self.pool.table(s.seq_id)), s.num_generated, *drafts[s.seq_id])


def verify_buckets(spec: Any, config: SpeculativeConfig | None, *, chunked: bool,
                   has_draft: bool = False) -> tuple[PrefillBucket, ...]:
  """The verify shapes of a GenerateSpec a step may use under `config`, smallest first, up to
  the first that holds K + 1 tokens (() when not speculating); a BundleError saying what to
  change when speculation cannot run on this bundle or config."""
  if (config is not None and config.method == "draft") != has_draft:
    raise BundleError("--speculative draft needs a draft model (--speculative-model NAME), and a"
                      " draft model needs --speculative draft")
  if config is None:
    return ()
  if not spec.verify_buckets:
    raise BundleError("speculative decoding needs the bundle's verify_<C> signatures, which this"
                      " bundle (exported before them) lacks: re-export it with"
                      " export/generative.py, or serve without --speculative")
  if not chunked:
    raise BundleError("speculative decoding needs chunked prefill (a bundle with extend"
                      " signatures, --chunked-prefill, no static batching)")
  for i, b in enumerate(spec.verify_buckets):
    if b.length >= config.num_tokens + 1:
      return tuple(spec.verify_buckets[:i + 1])
  raise BundleError(f"--num-speculative-tokens {config.num_tokens} needs a verify_<C> signature"
                    f" with C >= {config.num_tokens + 1}; the bundle has C in"
                    f" {[b.length for b in spec.verify_buckets]}")
