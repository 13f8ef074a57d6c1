"""Tuned block sizes as data: (device kind, op, shape class, dtype key) -> kernel block parameters.

Kernels look entries up at trace time and fall back from the exact key to wildcard ("*") keys, so
an unknown device or shape always gets the safe default. `benchmarks/kernels.py --tune` measures
candidates on a GPU and rewrites the table below with `rewrite_table`.
"""

from __future__ import annotations

import logging
import pathlib
import pprint
import types
from typing import Mapping

import jax

logger = logging.getLogger(__name__)

Key = tuple[str, str, str, str]  # (device kind, op, shape class, dtype key)
ANY = "*"
_BEGIN = "# BEGIN TUNED TABLE"
_END = "# END TUNED TABLE"

# The "*" device rows are heuristics. The H100 rows are the winners of `benchmarks/kernels.py --tune`
# on a lent H100 (jax 0.11.2, 2026-11-24); most decode-shape differences were within timing noise.
# BEGIN TUNED TABLE
_TABLE = {
    ('*', 'embedding_bag', '*', '*'): {'block_b': 32, 'block_d': 64, 'num_stages': 2, 'num_warps': 4},
    ('*', 'embedding_bag', 'wide', '*'): {'block_b': 16, 'block_d': 128, 'num_stages': 2, 'num_warps': 4},
    ('*', 'quantized_matmul', '*', '*'): {'block_k': 64, 'block_m': 64, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 1},
    ('*', 'quantized_matmul', 'decode', '*'): {'block_k': 256, 'block_m': 16, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 4},
    ('*', 'quantized_matmul', 'large', '*'): {'block_k': 64, 'block_m': 128, 'block_n': 128, 'num_stages': 2, 'num_warps': 8, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'embedding_bag', 'medium', 'float32'): {'block_b': 32, 'block_d': 32, 'num_stages': 2, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'decode', 'w8a16:bfloat16'): {'block_k': 64, 'block_m': 64, 'block_n': 128, 'num_stages': 4, 'num_warps': 4, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'decode', 'w8a8:bfloat16'): {'block_k': 256, 'block_m': 16, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 4},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'large', 'w8a16:bfloat16'): {'block_k': 64, 'block_m': 128, 'block_n': 128, 'num_stages': 3, 'num_warps': 8, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'large', 'w8a8:bfloat16'): {'block_k': 64, 'block_m': 128, 'block_n': 128, 'num_stages': 3, 'num_warps': 8, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'small', 'w8a16:bfloat16'): {'block_k': 64, 'block_m': 64, 'block_n': 128, 'num_stages': 4, 'num_warps': 4, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'quantized_matmul', 'small', 'w8a8:bfloat16'): {'block_k': 64, 'block_m': 64, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 1},
}
# END TUNED TABLE

TUNED_BLOCK_SIZES: Mapping[Key, Mapping[str, int]] = types.MappingProxyType(
    {k: types.MappingProxyType(dict(v)) for k, v in _TABLE.items()})


def matmul_shape_class(m: int, k: int, n: int) -> str:
  """Shape class of an [m, k] x [k, n] matmul: decode (m <= 16), small (m <= 256) or large."""
  del k, n  # The tables so far only need M; K and N are here so entries can split on them later.
  if m <= 16:
    return "decode"
  return "small" if m <= 256 else "large"


def embedding_shape_class(batch: int, bag: int, dim: int) -> str:
  """Shape class of an embedding bag: narrow (dim <= 32), medium (dim <= 64) or wide."""
  del batch, bag
  if dim <= 32:
    return "narrow"
  return "medium" if dim <= 64 else "wide"


def current_device_kind() -> str:
  """The first GPU's device kind (e.g. "NVIDIA H100 80GB HBM3"), or "*" where there is no GPU."""
  try:
    return jax.devices("gpu")[0].device_kind
  except RuntimeError:
    return ANY


def lookup(
    op: str,
    shape_class: str,
    dtype_key: str,
    *,
    device_kind: str | None = None,
    table: Mapping[Key, Mapping[str, int]] = TUNED_BLOCK_SIZES,
) -> dict[str, int]:
  """Block parameters for `op`, most specific key first; ("*", op, "*", "*") is the fallback."""
  device = current_device_kind() if device_kind is None else device_kind
  for d in dict.fromkeys((device, ANY)):
    for key in ((d, op, shape_class, dtype_key), (d, op, shape_class, ANY), (d, op, ANY, ANY)):
      if key in table:
        return dict(table[key])
  raise KeyError(f"no tuned block sizes for {op=}, not even the fallback ('*', {op!r}, '*', '*')")


def render_table(table: Mapping[Key, Mapping[str, int]]) -> str:
  """Python source of the table block (markers included) with keys and fields sorted."""
  lines = [_BEGIN, "_TABLE = {"]
  for key in sorted(table):
    lines.append(f"    {key!r}: {pprint.pformat(dict(sorted(table[key].items())), width=200)},")
  lines += ["}", _END]
  return "\n".join(lines)


def rewrite_table(
    entries: Mapping[Key, Mapping[str, int]], path: str | pathlib.Path | None = None
) -> pathlib.Path:
  """Merges `entries` over the current table and rewrites the table block of this module's file.

  The benchmark calls this with the winners of a `--tune` run; `path` defaults to this file.
  """
  for key, value in entries.items():
    if len(key) != 4 or not all(isinstance(part, str) for part in key):
      raise ValueError(f"{key=} must be (device kind, op, shape class, dtype key) strings")
    if not all(isinstance(v, int) for v in value.values()):
      raise ValueError(f"{value=} must map names to ints")
  merged = {k: dict(v) for k, v in TUNED_BLOCK_SIZES.items()}
  merged.update({k: dict(v) for k, v in entries.items()})
  path = pathlib.Path(__file__ if path is None else path)
  source = path.read_text()
  start = source.index(f"\n{_BEGIN}\n") + 1  # the marker lines, not the constants above
  end = source.index(f"\n{_END}\n") + 1 + len(_END)
  path.write_text(source[:start] + render_table(merged) + source[end:])
  logger.info("wrote %d tuned block size entries to %s", len(merged), path)
  return path
