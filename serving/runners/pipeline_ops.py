"""The built-in host ops a pipeline step may run (`bundle.OPS`): cheap glue between models.

tokenize: text [B] (BYTES) -> token_ids [B, L] int32 (UTF-8 bytes, 0-padded, at most
  `max_len`), lengths [B] int32; L is the longest text's length (at least 1).
top_k: scores [K] or [1, K] (or [K, 1]) and any tensors with K candidates on their first
  axis (after a leading 1) -> the `k` highest scores [1, k] and those tensors' rows in the same
  order [1, k, ...], highest first (ties keep candidate order).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

Op = Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], dict[str, np.ndarray]]


def tokenize(inputs: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> dict[str, np.ndarray]:
  if set(inputs) != {"text"}:
    raise ValueError(f"tokenize takes one input 'text', got {sorted(inputs)}")
  max_len = int(options.get("max_len", 64))
  texts = [t if isinstance(t, bytes) else str(t).encode() for t in inputs["text"].reshape(-1)]
  codes = [np.frombuffer(t[:max_len], np.uint8) for t in texts]
  lengths = np.array([len(c) for c in codes], np.int32)
  ids = np.zeros((len(codes), max(1, int(lengths.max(initial=0)))), np.int32)
  for row, c in zip(ids, codes):
    row[:len(c)] = c
  return {"token_ids": ids, "lengths": lengths}


def _candidates(name: str, x: np.ndarray, k: int | None) -> np.ndarray:
  """`x` with its candidate axis first: [K, ...] from [K, ...] or [1, K, ...]."""
  if x.ndim >= 2 and x.shape[0] == 1 and (k is None or x.shape[1] == k):
    x = x[0]
  if k is not None and x.shape[0] != k:
    raise ValueError(f"top_k: {name!r} has shape {list(x.shape)}, expected {k} candidates")
  return x


def top_k(inputs: Mapping[str, np.ndarray], options: Mapping[str, Any]) -> dict[str, np.ndarray]:
  if "scores" not in inputs:
    raise ValueError(f"top_k needs an input 'scores', got {sorted(inputs)}")
  scores = _candidates("scores", np.asarray(inputs["scores"]), None).reshape(-1)
  k = min(int(options.get("k", 10)), len(scores))
  order = np.argsort(-scores, kind="stable")[:k]
  out = {"scores": scores[order][None]}
  for name, x in inputs.items():
    if name != "scores":
      out[name] = _candidates(name, np.asarray(x), len(scores))[order][None]
  return out


OPS: dict[str, Op] = {"tokenize": tokenize, "top_k": top_k}
