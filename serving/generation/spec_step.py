"""The decode step when speculating (a mixin of GenerationService).

When any decode row carries draft tokens (serving/generation/speculative.py), the whole decode
batch runs through the engine's `verify` instead of `decode`: each row feeds [last token,
drafts] and gets back 1..drafts + 1 tokens. They are handed to the request one by one, exactly
as decoded tokens are, so EOS, stop sequences and max_tokens end a stream at the same token
(later tokens of that row are dropped) and streaming sends every one. Counts drafts proposed
and accepted for the metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from serving.generation.engine_api import StepLogprobs, sampling_arrays
from serving.generation.scheduler import DecodeBatch, PrefillBucket, Seq


class SpecSteps:
  """`_verify_inputs` and `_run_verify`; needs GenerationService's state (`_sched`, ...)."""

  _cv: Any
  _sched: Any
  _live: dict
  _counters: dict
  engine: Any
  _verify_buckets: tuple[PrefillBucket, ...]  # smallest first

  def _verify_inputs(self, dec: DecodeBatch) -> dict[str, Any]:
    """Host arrays of the verify call: row `slot` feeds [token, *draft] from `position`, in the
    smallest verify shape that holds the longest draft."""
    spec, fed = self.engine.spec, 1 + max(len(r.draft) for r in dec.rows)
    b = next(b for b in self._verify_buckets if b.length >= fed)
    tokens = np.full((b.batch, b.length), spec.pad_id, np.int32)
    starts, lengths = np.zeros(b.batch, np.int32), np.zeros(b.batch, np.int32)
    table = np.full((b.batch, spec.pages_per_seq), spec.null_page, np.int32)
    samp = []
    for r in dec.rows:
      row = (r.token, *r.draft)
      tokens[r.slot, :len(row)], starts[r.slot], lengths[r.slot] = row, r.position, len(row)
      table[r.slot, :len(r.pages)] = r.pages
      live = self._live.get(r.seq_id)  # None: cancelled while a draft model ran
      if live is not None:
        samp.append((r.slot, live.sampling, live.seed, r.num_generated))
    self._counters["decode_steps"] += 1
    self._counters["decode_rows"] += len(dec.rows)
    self._counters["spec_verify_steps"] += 1
    return {"bucket": b, "tokens": tokens, "starts": starts, "lengths": lengths,
            "page_table": table, "sampling": sampling_arrays(samp, b.batch)}

  def _draft_step(self, dec: DecodeBatch) -> tuple[DecodeBatch | None, Any, bool]:
    """Runs the draft model over the decode rows (every row feeds it, drafting or not) ->
    (the rows with their drafts, the engine inputs, whether to verify); None on failure."""
    drafts = self._execute(lambda: self._draft.propose(dec.rows))
    if drafts is None:
      return None, None, False
    rows = tuple(dataclasses.replace(r, draft=drafts[r.slot]) for r in dec.rows)
    dec = dataclasses.replace(dec, rows=rows)
    with self._cv:  # a row cancelled meanwhile still runs: its pages are not reused before
      verify = any(r.draft for r in rows)
      inputs = self._verify_inputs(dec) if verify else self._decode_inputs(dec.rows)
    return dec, inputs, verify

  def _run_verify(self, dec: DecodeBatch, inputs: dict[str, Any], seqs: list[Seq | None],
                  want_lp: bool) -> None:
    """Runs the verify call and hands each row's emitted tokens to its request, in order."""
    out = self._execute(lambda: self.engine.verify(**inputs))
    if out is None:
      return
    emitted, counts = out
    lp: StepLogprobs | None = self.engine.logprobs() if want_lp else None
    width = inputs["tokens"].shape[1]
    emit = []
    with self._cv:
      now = self._clock()
      for row, seq in zip(dec.rows, seqs):
        if seq is None or self._sched.get(row.seq_id) is not seq:
          continue  # cancelled while the step ran
        live, n = self._live[row.seq_id], int(counts[row.slot])
        self._counters["spec_draft_tokens"] += len(row.draft)
        self._counters["spec_accepted_tokens"] += n - 1
        for j in range(n):
          extra = ({} if lp is None or live.sampling.logprobs is None
                   else lp.event_fields(row.slot * width + j, live.sampling.logprobs))
          emit.append(self._on_token(live, int(emitted[row.slot, j]), now, extra))
          if emit[-1][1].finished:
            break
    self._send(emit)

  _execute: Callable[..., Any]
  _on_token: Callable[..., Any]
  _send: Callable[..., Any]
  _clock: Callable[[], float]
