"""A tiny engine whose outputs can be worked out by hand, so server tests are exact.

Inputs `x` FP32 [-1, 4] and `k` INT32 [-1, 1]; outputs `y` = 2 * sum(x) + 1 ([-1, 1])
and `z` = x * k ([-1, 4]). It records every bucket it ran, can sleep to mimic device
time, and can fail on demand (any x equal to `fail_value`) to test isolation.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import numpy as np

from bundle import TensorSpec
from serving.engines.base import Engine, Progress


class MockEngine(Engine):
  """Exact arithmetic with numpy; `dispatch` returns a handle that `fetch` resolves."""

  def __init__(self, *, buckets: tuple[int, ...] = (1, 2, 4, 8), delay_s: float = 0.0,
               fail_value: float | None = None):
    self.inputs = (TensorSpec("x", "float32", (-1, 4), ("batch", None)),
                   TensorSpec("k", "int32", (-1, 1), ("batch", None)))
    self.outputs = (TensorSpec("y", "float32", (-1, 1), ("batch", None)),
                    TensorSpec("z", "float32", (-1, 4), ("batch", None)))
    self.buckets = buckets
    self.delay_s = delay_s
    self.fail_value = fail_value
    self.batches: list[int] = []
    self.warm = False
    self._lock = threading.Lock()

  def warmup(self, *, progress: Progress | None = None) -> None:
    self.warm = True

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    x, k = inputs["x"], inputs["k"]
    if x.shape[0] != bucket or k.shape[0] != bucket:
      raise ValueError(f"batch has {x.shape[0]} rows, bucket is {bucket}")
    with self._lock:
      self.batches.append(bucket)
    return (x.copy(), k.copy())

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    x, k = handle
    if self.delay_s:
      time.sleep(self.delay_s)
    if self.fail_value is not None and np.any(x == self.fail_value):
      raise RuntimeError(f"injected failure: input held {self.fail_value}")
    return {"y": (2.0 * x.sum(axis=1, keepdims=True) + 1.0).astype(np.float32),
            "z": (x * k).astype(np.float32)}
