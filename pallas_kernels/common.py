"""Constants and helpers shared by the kernel families, each defined once.

`device_kind` is the one way the kernels and the kernel benchmark read the device kind that keys
the tuned block-size tables (`tuned_block_sizes.py`).
"""

from __future__ import annotations

import math

import jax
import numpy as np

# The wildcard of a tuned-table key; also `device_kind()` where there is no GPU.
ANY = "*"
# Softmax mask: finite, so a fully masked key block never computes inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2_E = math.log2(math.e)  # e^x = 2^(x LOG2_E): the attention kernels work in the exp2 domain.
MIN_DOT_DIM = 16  # Triton's tl.dot needs every matmul (tile) dimension >= 16.


def is_pow2(x: int) -> bool:
  """True for 1, 2, 4, ...; False for 0 and negatives."""
  return x > 0 and x & (x - 1) == 0


def device_kind() -> str:
  """The first GPU's device kind (e.g. "NVIDIA H100 80GB HBM3"), or `ANY` where there is no GPU.

  Read at trace time, never at import. A CUDA lowering from a CPU-only host gets `ANY`, so the
  table lookups fall back to their safe defaults.
  """
  try:
    return jax.devices("gpu")[0].device_kind
  except RuntimeError:
    return ANY
