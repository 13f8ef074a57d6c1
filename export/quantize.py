"""Quantization chosen at export time: rewrites a model's params before it is exported."""

from __future__ import annotations

from typing import Any

QUANTIZATIONS: tuple[str, ...] = ("none",)


def quantize_for_export(model: Any, mode: str) -> Any:
  """Returns the model with its params quantized as `mode` says ("none": unchanged)."""
  if mode not in QUANTIZATIONS:
    raise ValueError(f"quantization={mode!r} must be one of {QUANTIZATIONS}")
  return model
