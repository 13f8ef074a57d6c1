"""Where each embedding table of a model lives under a device memory budget: the settings
(`EmbeddingCacheConfig`, from a model's config.json or a server flag) and the decision
(`plan_tables`): small tables fully on the device, the rest cached (hottest rows on the
device, the whole table in host memory or memory-mapped from disk)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

import numpy as np

from bundle import ParamSpec, TableLookup, numpy_dtype

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
          "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str | int | float) -> int:
  """'512MiB', '2GB', '1.5g', 1048576 -> bytes; raises ValueError with the accepted forms."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value, unit = float(text), ""
  else:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
      raise ValueError(f"{text!r} is not a size: write e.g. 512MiB, 2GiB, 1.5GB or a byte count")
    value, unit = float(m.group(1)), m.group(2).lower()
  if value < 0:
    raise ValueError(f"size {text!r} must not be negative")
  return int(value * _UNITS[unit])


@dataclasses.dataclass(frozen=True, slots=True)
class EmbeddingCacheConfig:
  """How a model's embedding tables are placed; every field optional.

  `device_budget_bytes`: device memory the tables and caches may take (rows x row bytes);
  None with no `cache_ratios`: every table on the device (no cache). `cache_ratios`: table (param path, or feature index as a
  string) -> fraction of its rows to cache on the device (1.0 or more: fully on device);
  tables it names are placed by it, the budget places the others. `host`: "memory" (the whole
  table in host RAM) or "mmap" (memory-mapped from a raw copy written beside the bundle, for
  tables larger than host memory). `min_device_table_bytes`: tables this small always stay
  on the device. `aging_lookups`: LFU counters halve after this many lookups per cached row.
  """

  device_budget_bytes: int | None = None
  cache_ratios: tuple[tuple[str, float], ...] = ()  # (table, ratio) pairs
  host: str = "memory"
  min_device_table_bytes: int = 1 << 20
  aging_lookups: int = 16
  seed: int = 0

  def __post_init__(self):
    if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
      raise ValueError(f"device_budget_bytes must be >= 0, got {self.device_budget_bytes}")
    if self.host not in ("memory", "mmap"):
      raise ValueError(f"embedding_cache host {self.host!r} must be memory or mmap")
    for k, r in self.cache_ratios:
      if not (isinstance(r, (int, float)) and r > 0):
        raise ValueError(f"cache ratio for {k!r} must be a number > 0, got {r!r}")
    if self.aging_lookups < 1:
      raise ValueError(f"aging_lookups must be >= 1, got {self.aging_lookups}")

  @property
  def enabled(self) -> bool:
    return self.device_budget_bytes is not None or bool(self.cache_ratios)

  @classmethod
  def from_json(cls, d: Mapping[str, Any] | None) -> EmbeddingCacheConfig:
    """From config.json's "embedding_cache" object: "device_budget" ("512MiB" or bytes),
    "cache_ratios", "host", "min_device_table_bytes", "aging_lookups", "seed"."""
    if d is None:
      return cls()
    if not isinstance(d, Mapping):
      raise ValueError(f"embedding_cache must be an object, got {type(d).__name__}")
    known = {"device_budget", "cache_ratios", "host", "min_device_table_bytes", "aging_lookups",
             "seed"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"embedding_cache: unknown keys {unknown} (known: {sorted(known)})")
    budget = d.get("device_budget")
    return cls(device_budget_bytes=None if budget is None else parse_bytes(budget),
               cache_ratios=tuple(sorted((str(k), float(v))
                                         for k, v in (d.get("cache_ratios") or {}).items())),
               host=d.get("host", "memory"),
               min_device_table_bytes=parse_bytes(d.get("min_device_table_bytes", 1 << 20)),
               aging_lookups=int(d.get("aging_lookups", 16)), seed=int(d.get("seed", 0)))


@dataclasses.dataclass(frozen=True, slots=True)
class TablePlan:
  """One feature's table: where it lives and, if cached, how many rows the device holds."""

  feature: int
  path: str  # the table's param path
  rows: int
  row_bytes: int  # device bytes per row (codes plus scale and offset for 8-bit tables)
  cache_rows: int | None  # None: fully on the device

  @property
  def placement(self) -> str:
    return "device" if self.cache_rows is None else "cached"

  @property
  def device_bytes(self) -> int:
    return self.row_bytes * (self.rows if self.cache_rows is None else self.cache_rows + 1)

  def describe(self) -> str:
    if self.cache_rows is None:
      return f"{self.path}: on device ({self.rows} rows, {self.device_bytes / 2**20:.1f} MiB)"
    return (f"{self.path}: cached, {self.cache_rows} of {self.rows} rows on device"
            f" ({self.cache_rows / self.rows:.1%}, {self.device_bytes / 2**20:.1f} MiB)")


def plan_tables(lookup: TableLookup, params: Sequence[ParamSpec],
                config: EmbeddingCacheConfig) -> tuple[TablePlan, ...]:
  """Each feature's placement. Named ratios first; then the smallest tables fully on the device
  while the budget lasts; the rest share what is left in proportion to their size, each cache
  at least 1 row. Raises ValueError when a table is named twice or a ratio names no table."""
  row_bytes = lookup.dim * numpy_dtype(lookup.table_dtype).itemsize + (8 if lookup.scales else 0)
  paths = [params[i].path for i in lookup.tables]
  if len(set(lookup.tables)) != len(lookup.tables):
    raise ValueError("features sharing one table cannot be cached; place them on the device")
  names = {**{p: f for f, p in enumerate(paths)}, **{str(f): f for f in range(len(paths))}}
  ratios = dict(config.cache_ratios)
  unknown = sorted(set(ratios) - set(names))
  if unknown:
    raise ValueError(f"embedding_cache cache_ratios name {unknown}: no such table (tables:"
                     f" {paths}, or their feature index)")
  cache: dict[int, int | None] = {}
  for key, ratio in ratios.items():
    f = names[key]
    cache[f] = None if ratio >= 1 else max(1, int(lookup.rows[f] * ratio))
  budget = config.device_budget_bytes
  rest = [f for f in range(len(paths)) if f not in cache]
  if budget is None:
    cache.update({f: None for f in rest})
  else:
    left = budget - sum(row_bytes * (lookup.rows[f] if c is None else c + 1)
                        for f, c in cache.items())
    big = []
    for f in sorted(rest, key=lambda f: lookup.rows[f]):
      size = lookup.rows[f] * row_bytes
      if size <= config.min_device_table_bytes or size <= left:
        cache[f], left = None, left - size
      else:
        big.append(f)
    total = sum(lookup.rows[f] for f in big)
    for f in big:
      share = max(left, 0) * lookup.rows[f] / max(total, 1)
      cache[f] = int(np.clip(share // row_bytes - 1, 1, lookup.rows[f] - 1))
  return tuple(TablePlan(f, paths[f], lookup.rows[f], row_bytes, cache[f])
               for f in range(len(paths)))
