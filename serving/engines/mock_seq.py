"""A tiny sequence engine whose outputs can be worked out by hand, so 2-D batching tests are exact.

Inputs `tokens` and `segments` INT32 [-1, -1] (batch, seq) and `lengths` INT32 [-1];
outputs `total` FP32 [-1, 1] = sum of the first `lengths` tokens of each row plus 1000 x
the sum of its first `lengths` segments, and `doubled` INT32 [-1, -1] = 2 * tokens (an
output with a seq dimension). It records every (batch, seq) bucket it ran,
checks that batches arrive exactly on the grid, and can fail on demand (a token equal
to `fail_token`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import numpy as np

from bundle import TensorSpec
from serving.engines.base import Engine, Progress


class MockSeqEngine(Engine):
  """Exact numpy arithmetic on a (batch bucket x sequence bucket) grid."""

  def __init__(self, *, buckets: tuple[int, ...] = (1, 2, 4, 8),
               seq_buckets: tuple[int, ...] = (4, 8, 16), delay_s: float = 0.0,
               fail_token: int | None = None):
    self.inputs = (TensorSpec("tokens", "int32", (-1, -1), ("batch", "seq")),
                   TensorSpec("segments", "int32", (-1, -1), ("batch", "seq")),
                   TensorSpec("lengths", "int32", (-1,), ("batch",)))
    self.outputs = (TensorSpec("total", "float32", (-1, 1), ("batch", None)),
                    TensorSpec("doubled", "int32", (-1, -1), ("batch", "seq")))
    self.buckets = buckets
    self.seq_buckets = seq_buckets
    self.delay_s = delay_s
    self.fail_token = fail_token
    self.batches: list[tuple[int, int]] = []
    self.warm = False
    self._lock = threading.Lock()

  def warmup(self, *, progress: Progress | None = None) -> None:
    self.warm = True

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    tokens, segments, lengths = inputs["tokens"], inputs["segments"], inputs["lengths"]
    if tokens.shape[0] != bucket or lengths.shape != (bucket,) or segments.shape != tokens.shape:
      raise ValueError(f"batch has {tokens.shape[0]} rows, bucket is {bucket}")
    if tokens.shape[1] not in self.seq_buckets:
      raise ValueError(f"sequence {tokens.shape[1]} is not a bucket {self.seq_buckets}")
    with self._lock:
      self.batches.append((bucket, tokens.shape[1]))
    return tokens.copy(), segments.copy(), lengths.copy()

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    tokens, segments, lengths = handle
    if self.delay_s:
      time.sleep(self.delay_s)
    if self.fail_token is not None and np.any(tokens == self.fail_token):
      raise RuntimeError(f"injected failure: a token was {self.fail_token}")
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    total = np.where(valid, tokens + 1000 * segments, 0).sum(axis=1, keepdims=True)
    total = total.astype(np.float32)
    return {"total": total, "doubled": (2 * tokens).astype(np.int32)}
