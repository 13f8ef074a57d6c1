"""Host arrays of the whole-prefill and decode engine calls (a mixin of GenerationService).

Each builder fills the fixed shapes of one compiled call from the scheduler's rows (padding rows
idle: null-page tables, pad tokens, length 0) and counts the call; kept apart from service.py,
which drives the loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.generation.engine_api import sampling_arrays
from serving.generation.scheduler import DecodeRow, PrefillBatch


class StepInputs:
  """`_prefill_inputs` and `_decode_inputs`; needs GenerationService's state (`_live`, ...)."""

  _live: dict
  _counters: dict
  engine: Any

  def _prefill_inputs(self, batch: PrefillBatch, now: float) -> dict[str, np.ndarray]:
    spec, b = self.engine.spec, batch.bucket
    tokens = np.full((b.batch, b.length), spec.pad_id, np.int32)
    lengths = np.zeros(b.batch, np.int32)
    table = np.full((b.batch, spec.pages_per_seq), spec.null_page, np.int32)
    rows = []
    for i, r in enumerate(batch.rows):
      tokens[i, :len(r.tokens)] = r.tokens
      lengths[i] = len(r.tokens)
      table[i, :len(r.pages)] = r.pages
      live = self._live[r.seq_id]
      live.admitted = now if live.admitted is None else live.admitted
      rows.append((i, live.sampling, live.seed, r.num_generated))
    self._counters["prefill_calls"] += 1
    self._counters["prefill_rows"] += len(batch.rows)
    self._counters["prefill_tokens"] += int(lengths.sum())
    return {"tokens": tokens, "lengths": lengths, "page_table": table,
            "sampling": sampling_arrays(rows, b.batch)}

  def _decode_inputs(self, rows: tuple[DecodeRow, ...]) -> dict[str, np.ndarray]:
    spec = self.engine.spec
    n = spec.decode_batch
    tokens = np.full(n, spec.pad_id, np.int32)
    positions, lengths = np.zeros(n, np.int32), np.zeros(n, np.int32)
    table = np.full((n, spec.pages_per_seq), spec.null_page, np.int32)
    samp = []
    for r in rows:
      tokens[r.slot], positions[r.slot], lengths[r.slot] = r.token, r.position, r.position + 1
      table[r.slot, :len(r.pages)] = r.pages
      live = self._live.get(r.seq_id)  # None: cancelled while a draft model ran
      if live is not None:
        samp.append((r.slot, live.sampling, live.seed, r.num_generated))
    self._counters["decode_steps"] += 1
    self._counters["decode_rows"] += len(rows)
    return {"tokens": tokens, "positions": positions, "lengths": lengths, "page_table": table,
            "sampling": sampling_arrays(samp, n)}
