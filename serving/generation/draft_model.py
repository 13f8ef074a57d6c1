"""A small draft LM for speculative decoding: a second generate engine proposing greedy drafts.

The draft bundle must share the target's tokenizer and KV-cache geometry (page size, page
count, pages per sequence, decode batch, chunk buckets): its own cache arrays then use the
target's page tables as they are, so the scheduler's page accounting (and prefix sharing)
covers both, and no page is ever written by one model for a sequence the other does not own.

Keeping the draft's cache in step with the target's: every prefill chunk the target runs, the
draft runs too (same inputs); every decode step feeds the draft each row's last token, then its
own drafts one by one, the last one included, so whatever prefix the target accepts, the draft
holds K/V for every committed token but the newest, like the target. Rejected drafts' K/V lie
past the accepted length and are overwritten later, as in the target.

Drafts are greedy (deterministic: q is one-hot), so the target's rejection rule
(spec_sampling.py) keeps its output distribution exactly.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bundle import BundleError
from serving.generation.engine_api import Engine, GenerateSpec, sampling_arrays
from serving.generation.scheduler import DecodeRow, PrefillBucket

_SAME = ("page_size", "num_pages", "null_page", "pages_per_seq", "max_seq_len", "decode_batch",
         "vocab_size", "bos_id", "eos_id", "pad_id", "extend_buckets")


def check_compatible(target: GenerateSpec, draft: GenerateSpec) -> None:
  """BundleError naming the first cache-geometry or tokenizer field the two bundles differ in."""
  for field in _SAME:
    a, b = getattr(target, field), getattr(draft, field)
    if a != b:
      raise BundleError(f"the draft model's {field} is {b}, the target's {a}: export the draft"
                        " with the target's GenerativeExportConfig (only the model may differ)")
  if dict(target.tokenizer) != dict(draft.tokenizer):
    raise BundleError("the draft model's tokenizer differs from the target's")


class DraftModel:
  """Proposes up to `row.room` greedy draft tokens per decode row (engine calls, no lock)."""

  def __init__(self, engine: Engine, target: GenerateSpec):
    check_compatible(target, engine.spec)
    self.engine = engine

  def extend(self, bucket: PrefillBucket, inputs: Mapping[str, Any]) -> bool:
    """Runs the target's prefill chunk through the draft (its sampled tokens are not used)."""
    self.engine.extend(bucket=bucket, **inputs)
    return True

  def propose(self, rows: tuple[DecodeRow, ...]) -> dict[int, tuple[int, ...]]:
    """Slot -> drafts: 1 + max(room) draft decode calls; row r feeds its last token, then
    d_1 .. d_room (the last only to keep the draft's cache in step)."""
    sp = self.engine.spec
    n = sp.decode_batch
    table = np.full((n, sp.pages_per_seq), sp.null_page, np.int32)
    for r in rows:
      table[r.slot, :len(r.pages)] = r.pages
    drafts: dict[int, list[int]] = {r.slot: [] for r in rows}
    greedy = sampling_arrays((), n)
    for i in range(1 + max((r.room for r in rows), default=0)):
      tokens = np.full(n, sp.pad_id, np.int32)
      positions, lengths = np.zeros(n, np.int32), np.zeros(n, np.int32)
      for r in rows:
        if i <= r.room:
          tokens[r.slot] = r.token if i == 0 else drafts[r.slot][i - 1]
          positions[r.slot] = r.position + i
          lengths[r.slot] = r.position + i + 1
      out = self.engine.decode(tokens=tokens, positions=positions, lengths=lengths,
                               page_table=table, sampling=greedy)
      for r in rows:
        if i < r.room:
          drafts[r.slot].append(int(out[r.slot]))
    return {slot: tuple(d) for slot, d in drafts.items()}

  def reset(self) -> None:
    self.engine.reset()

  def close(self) -> None:
    self.engine.close()
