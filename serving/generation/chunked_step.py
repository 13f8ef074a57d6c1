"""The service loop's step when prefill is chunked (a mixin of GenerationService).

One step runs what `ChunkedScheduler.schedule()` decided under the service lock: the chunk
batches through `engine.extend` (recording each row's progress; only a prefill's last chunk
yields a token), then the decode batch (a verify pass when it carries drafts: spec_step.py). Kept apart from service.py so the whole-prefill loop
there stays as it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.generation.chunking import ChunkBatch
from serving.generation.engine_api import sampling_arrays


class ChunkedSteps:
  """`_step_chunked` and its input builder; needs GenerationService's state (`_sched`, ...)."""

  _cv: Any
  _sched: Any
  _live: dict
  _counters: dict
  engine: Any
  _draft: Any

  def _step_chunked(self) -> None:
    """Chunk batches, then the decode batch, all scheduled at once under the token budget."""
    with self._cv:
      step = self._sched.schedule()
      now = self._clock()
      chunks = [(b, self._chunk_inputs(b, now), [self._sched.get(r.seq_id) for r in b.rows],
                 self._want_lp(b.rows)) for b in step.chunks]
      dec = step.decode
      if dec is not None:  # with drafts (speculative decoding) the decode is a verify pass
        verify = any(r.draft for r in dec.rows)
        inputs = (None if self._draft is not None else self._verify_inputs(dec) if verify
                  else self._decode_inputs(dec.rows))
        seqs = [self._sched.get(r.seq_id) for r in dec.rows]
        want = self._want_lp(dec.rows)
    for batch, chunk_inputs, chunk_seqs, want_chunk in chunks:
      tokens = self._execute(lambda: self.engine.extend(bucket=batch.bucket, **chunk_inputs))
      if tokens is None or (self._draft is not None and self._execute(
          lambda: self._draft.extend(batch.bucket, chunk_inputs)) is None):
        return
      with self._cv:  # record progress; only a prefill's last chunk yields a token
        done = [(i, r, s) for i, (r, s) in enumerate(zip(batch.rows, chunk_seqs))
                if s is not None and self._sched.get(r.seq_id) is s]
        for _, r, _ in done:
          self._sched.chunk_done(r)
      last = [(i, r, s) for i, r, s in done if r.last]
      lp = self.engine.logprobs() if want_chunk and last else None
      self._apply(tuple(r for _, r, _ in last), [s for _, _, s in last], tokens,
                  [i for i, _, _ in last], lp)
    if dec is not None and self._draft is not None:  # the draft model proposes now
      dec, inputs, verify = self._draft_step(dec)
      if dec is None:
        return
    if dec is not None and verify:
      self._run_verify(dec, inputs, seqs, want)
    elif dec is not None:
      tokens = self._execute(lambda: self.engine.decode(**inputs))
      if tokens is not None:
        lp = self.engine.logprobs() if want else None
        self._apply(dec.rows, seqs, tokens, [r.slot for r in dec.rows], lp)

  def _chunk_inputs(self, batch: ChunkBatch, now: float) -> dict[str, np.ndarray]:
    spec, b = self.engine.spec, batch.bucket
    arrays = {"tokens": np.full((b.batch, b.length), spec.pad_id, np.int32),
              "starts": np.zeros(b.batch, np.int32), "lengths": np.zeros(b.batch, np.int32),
              "page_table": np.full((b.batch, spec.pages_per_seq), spec.null_page, np.int32)}
    rows = []
    for i, r in enumerate(batch.rows):
      arrays["tokens"][i, :len(r.tokens)] = r.tokens
      arrays["starts"][i], arrays["lengths"][i] = r.start, len(r.tokens)
      arrays["page_table"][i, :len(r.pages)] = r.pages
      live = self._live[r.seq_id]
      live.admitted = now if live.admitted is None else live.admitted
      rows.append((i, live.sampling, live.seed, r.num_generated))
    self._counters["prefill_calls"] += 1
    self._counters["prefill_rows"] += len(batch.rows)
    self._counters["prefill_tokens"] += int(arrays["lengths"].sum())
    return {**arrays, "sampling": sampling_arrays(rows, b.batch)}
