"""Prompt-lookup (n-gram) drafts for speculative decoding: plain Python, no model, no JAX.

The draft for a sequence is the k tokens that followed the most recent earlier occurrence of
its last n tokens, in its own prompt + output (longest n first, from `max_n` down to `min_n`).
Ad copy repeats the prompt's words (brand, product, offer), so such continuations are often
what the target would say; a wrong draft costs only the verify pass's extra positions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def ngram_propose(tokens: Sequence[int], k: int, *, max_n: int = 3, min_n: int = 1) -> list[int]:
  """Up to `k` draft tokens continuing `tokens` ([] when no n-gram of its tail recurs)."""
  if k < 1 or len(tokens) < min_n + 1:
    return []
  seq = np.asarray(tokens, np.int32)
  data = seq.tobytes()  # 4 bytes a token: bytes.rfind does the scan in C
  for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
    pattern = seq[-n:].tobytes()
    end = len(data) - 4  # the match must be followed by at least one token
    while (at := data.rfind(pattern, 0, end)) >= 0:
      if at % 4 == 0:  # aligned to a token, not straddling two
        start = at // 4 + n
        return seq[start:start + k].tolist()
      end = at + len(pattern) - 1  # the next candidate starts before `at`
  return []
