"""What a sharded executable costs: collectives in its compiled HLO and bytes per device.

`collectives(compiled.as_text())` reads the per-device SPMD program after partitioning, so the
counts and bytes are per device and per execution (a collective inside a loop body is counted
once). Bytes are those of the op's result on one device: the reduced array for all-reduce, the
gathered array for all-gather, the scattered piece for reduce-scatter.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

import jax

COLLECTIVE_OPS: tuple[str, ...] = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
)

_DTYPE_BYTES: Mapping[str, float] = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
    "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
# `%name = <result shape> op(` ; op may be async (-start; the matching -done is skipped).
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+(?P<op>"
    + "|".join(COLLECTIVE_OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True, slots=True)
class Collective:
  """One collective instruction of a per-device program."""

  op: str  # one of COLLECTIVE_OPS
  shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
  nbytes: int  # result bytes on one device


@dataclasses.dataclass(frozen=True, slots=True)
class CollectiveStats:
  """Count and bytes per collective kind."""

  count: Mapping[str, int]
  nbytes: Mapping[str, int]

  @property
  def total_bytes(self) -> int:
    return sum(self.nbytes.values())

  @property
  def total_count(self) -> int:
    return sum(self.count.values())


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dt, tuple(int(d) for d in dims.split(",") if d))
          for dt, dims in _ARRAY.findall(shape_text) if dt in _DTYPE_BYTES]


def _nbytes(arrays: Iterable[tuple[str, tuple[int, ...]]]) -> int:
  return int(sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in arrays))


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective in an HLO module's text (e.g. `jax.jit(f).lower(...).compile().as_text()`)."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    arrays = _arrays(m.group("shape"))
    if m.group("start") and m.group("op") != "all-reduce":
      # async all-gather/permute/... results are (operands..., outputs..., [u32 contexts]):
      # keep the outputs, the second half of the non-scalar arrays.
      arrays = [a for a in arrays if a[1]] or arrays
      arrays = arrays[len(arrays) // 2:]
    out.append(Collective(m.group("op"), tuple(arrays), _nbytes(arrays)))
  return out


def collective_stats(hlo_text: str) -> CollectiveStats:
  """Counts and bytes per kind (every kind in COLLECTIVE_OPS present, zero if absent)."""
  count: dict[str, int] = collections.Counter()
  nbytes: dict[str, int] = collections.Counter()
  for c in collectives(hlo_text):
    count[c.op] += 1
    nbytes[c.op] += c.nbytes
  return CollectiveStats({k: count[k] for k in COLLECTIVE_OPS},
                         {k: nbytes[k] for k in COLLECTIVE_OPS})


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
  """Bytes each addressable device holds for a tree of placed jax.Arrays (from their shards)."""
  out: dict[jax.Device, int] = collections.defaultdict(int)
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] += shard.data.nbytes
  return dict(out)


def peak_memory_bytes(compiled: Any) -> int | None:
  """Per-device peak from `compiled.memory_analysis()` (args + outputs + temps - aliased), if known."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
