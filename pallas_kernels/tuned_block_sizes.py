"""Tuned block sizes as data: (device kind, op, shape class, dtype key) -> kernel block parameters.

One table for the four kernel families (quantized_matmul, embedding_bag, flash_attention,
paged_attention). Kernels look entries up at trace time and fall back from the exact key to
wildcard ("*") keys, so an unknown device or shape always gets the safe default (each family's
("*", op, "*", "*") row equals its `BlockSizes()` defaults). `benchmarks/kernels.py --tune` measures
candidates on a GPU with `tune` (each family's `TUNING_CANDIDATES`) and rewrites the table below with
`rewrite_table`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import pprint
import types
from typing import Any, Callable, Mapping

import jax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import ANY, MIN_DOT_DIM

logger = logging.getLogger(__name__)

Key = tuple[str, str, str, str]  # (device kind, op, shape class, dtype key)
OPS: tuple[str, ...] = ("embedding_bag", "flash_attention", "paged_attention", "quantized_matmul")
_BEGIN = "# BEGIN TUNED TABLE"
_END = "# END TUNED TABLE"

# The "*" device rows are heuristics. The H100 quantized_matmul and embedding_bag rows are the winners
# of `benchmarks/kernels.py --tune` on a lent H100 (jax 0.11.2, 2026-11-24); most decode-shape
# differences were within timing noise. The H100 flash_attention and paged_attention rows are seeds,
# NOT measurements: jax's `ops/gpu/attention.py` heuristics (128x128 tiles for long sequences,
# num_warps 4 for head_dim <= 64) and `ops/gpu/paged_attention.py` defaults (block_h 16, 8 pages per
# step). Each compiles for sm_90 within shared memory (flash 128x128 at head_dim 128 needs 160 KiB at
# 2 stages, 224 KiB at 3). Shape classes: `matmul_shape_class`, `embedding_shape_class`,
# `flash_shape_class`, `paged_shape_class`; dtype keys: "{mode}:{x dtype}" for quantized_matmul, the
# table dtype for embedding_bag, q's dtype for flash_attention, the cache dtype for paged_attention.
# BEGIN TUNED TABLE
_TABLE = {
    ('*', 'embedding_bag', '*', '*'): {'block_b': 32, 'block_d': 64, 'num_stages': 2, 'num_warps': 4},
    ('*', 'embedding_bag', 'wide', '*'): {'block_b': 16, 'block_d': 128, 'num_stages': 2, 'num_warps': 4},
    ('*', 'flash_attention', '*', '*'): {'block_k': 64, 'block_q': 64, 'num_stages': 2, 'num_warps': 4},
    ('*', 'paged_attention', '*', '*'): {'block_h': 16, 'num_stages': 2, 'num_warps': 4, 'pages_per_compute_block': 8},
    ('*', 'quantized_matmul', '*', '*'): {'block_k': 64, 'block_m': 64, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 1},
    ('*', 'quantized_matmul', 'decode', '*'): {'block_k': 256, 'block_m': 16, 'block_n': 64, 'num_stages': 3, 'num_warps': 4, 'split_k': 4},
    ('*', 'quantized_matmul', 'large', '*'): {'block_k': 64, 'block_m': 128, 'block_n': 128, 'num_stages': 2, 'num_warps': 8, 'split_k': 1},
    ('NVIDIA H100 80GB HBM3', 'embedding_bag', 'medium', 'float32'): {'block_b': 32, 'block_d': 32, 'num_stages': 2, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 'long_d128', 'bfloat16'): {'block_k': 128, 'block_q': 128, 'num_stages': 2, 'num_warps': 8},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 'long_d64', 'bfloat16'): {'block_k': 128, 'block_q': 128, 'num_stages': 3, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 's1024_d128', 'bfloat16'): {'block_k': 64, 'block_q': 128, 'num_stages': 2, 'num_warps': 8},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 's1024_d64', 'bfloat16'): {'block_k': 64, 'block_q': 128, 'num_stages': 3, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 's256_d64', 'bfloat16'): {'block_k': 64, 'block_q': 64, 'num_stages': 2, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'flash_attention', 's64_d64', 'bfloat16'): {'block_k': 64, 'block_q': 32, 'num_stages': 2, 'num_warps': 4},
    ('NVIDIA H100 80GB HBM3', 'paged_attention', 'p16_d128', 'bfloat16'): {'block_h': 16, 'num_stages': 2, 'num_warps': 8, 'pages_per_compute_block': 8},
    ('NVIDIA H100 80GB HBM3', 'paged_attention', 'p16_d128', 'int8'): {'block_h': 16, 'num_stages': 2, 'num_warps': 8, 'pages_per_compute_block': 8},
    ('NVIDIA H100 80GB HBM3', 'paged_attention', 'p16_d64', 'bfloat16'): {'block_h': 16, 'num_stages': 2, 'num_warps': 4, 'pages_per_compute_block': 8},
    ('NVIDIA H100 80GB HBM3', 'paged_attention', 'p16_d64', 'int8'): {'block_h': 16, 'num_stages': 2, 'num_warps': 4, 'pages_per_compute_block': 8},
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

# What `benchmarks/kernels.py --tune` times per op: each family's BlockSizes fields and candidates.
_CANDIDATE_ROWS = (
    ("quantized_matmul", ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"),
     ((16, 64, 256, 4, 4, 3), (16, 64, 128, 8, 4, 4), (16, 128, 128, 4, 4, 3),
      (64, 64, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (64, 128, 64, 1, 4, 4))),
    ("embedding_bag", ("block_b", "block_d", "num_warps", "num_stages"),
     tuple((bb, bd, nw, ns) for bb in (16, 32, 64) for bd in (32, 64)
           for nw, ns in ((4, 2), (8, 2)))),
    ("flash_attention", ("block_q", "block_k", "num_warps", "num_stages"),
     ((32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2),
      (128, 128, 4, 3), (128, 128, 8, 2))),
    ("paged_attention", ("block_h", "pages_per_compute_block", "num_warps", "num_stages"),
     tuple((16, pp, nw, ns) for pp in (4, 8, 16) for nw, ns in ((4, 2), (8, 2), (4, 3)))),
)
TUNING_CANDIDATES: Mapping[str, tuple[Mapping[str, int], ...]] = types.MappingProxyType({
    op: tuple(types.MappingProxyType(dict(zip(fields, row))) for row in rows)
    for op, fields, rows in _CANDIDATE_ROWS})


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


def flash_shape_class(seq_k: int, head_dim: int) -> str:
  """Shape class of flash attention: key length bucket and padded head_dim, e.g. "s256_d64"."""
  d = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))
  for bucket in (64, 256, 1024):
    if seq_k <= bucket:
      return f"s{bucket}_d{d}"
  return f"long_d{d}"


def paged_shape_class(page_size: int, head_dim: int) -> str:
  """Shape class of paged attention: page size and padded head_dim, e.g. "p16_d64"."""
  d = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))
  return f"p{page_size}_d{d}"


def lookup(
    op: str,
    shape_class: str,
    dtype_key: str,
    *,
    device_kind: str | None = None,
    table: Mapping[Key, Mapping[str, int]] = TUNED_BLOCK_SIZES,
) -> dict[str, int]:
  """Block parameters for `op`, most specific key first; ("*", op, "*", "*") is the fallback."""
  device = common.device_kind() if device_kind is None else device_kind
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
    if key[1] not in OPS:
      raise ValueError(f"{key=}: the op must be one of {OPS}")
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


@dataclasses.dataclass(frozen=True)
class TuneJob:
  """One table row to measure: `fn(*make_args(), block_sizes=c, impl="pallas", **kwargs)` per candidate."""

  op: str
  shape_class: str
  dtype_key: str
  block_sizes: type  # the op's BlockSizes dataclass, built from each of TUNING_CANDIDATES[op]
  fn: Callable[..., Any]
  make_args: Callable[[], tuple[Any, ...]]  # built only when the job runs
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def tune(
    jobs: list[TuneJob],
    device: str,
    time_ms: Callable[[Callable[..., Any], tuple[Any, ...]], float],
    progress: Callable[[str], None] = logger.info,
) -> dict[Key, dict[str, int]]:
  """Times each job's candidates with `time_ms(jitted fn, args)`; the winners as entries for `device`.

  A candidate that fails to compile or run is reported and skipped; a job with no candidate left
  gives no entry. Pass the result to `rewrite_table`.
  """
  entries = {}
  for job in jobs:
    args, best = job.make_args(), None
    for candidate in TUNING_CANDIDATES[job.op]:
      blocks = job.block_sizes(**candidate)
      label = f"{job.op} {job.shape_class} {job.dtype_key} {blocks}"
      fn = jax.jit(functools.partial(job.fn, block_sizes=blocks, impl="pallas", **job.kwargs))
      try:
        ms = time_ms(fn, args)
      except Exception as e:  # pylint: disable=broad-except
        progress(f"  tune {label}: failed ({type(e).__name__})")
        continue
      progress(f"  tune {label}: {ms:.3f} ms")
      if best is None or ms < best[0]:
        best = (ms, blocks)
    if best is not None:
      entries[(device, job.op, job.shape_class, job.dtype_key)] = dataclasses.asdict(best[1])
  return entries
