"""The large-table demo `dlrm_large`: a DLRM whose categorical tables total several GiB (4 by
default), generated at build time (never downloaded) and shaped like production ads models: three
huge id spaces hold 90% of the bytes, five medium ones most of the rest, eighteen small ones
almost nothing (26 features, as Criteo). Served under a device budget (`xlaserve serve --demo
dlrm_large --embedding-device-budget 512MiB`) the small and medium tables stay on the device and
the huge ones are cached (serving/engines/cached): their hottest rows on the device.

The demo's traffic is skewed like real ids (`skewed_ids`): each feature's id rank follows a Zipf
law (exponent `ZIPF_EXPONENT`), and rank r maps to row `rank_to_row(r)`, a fixed permutation
that scatters the hot rows over the table as hashing does. The bundle's `hot_rows.npz` lists, per
huge and medium table, the rows of the lowest ranks (the hottest under that law, hottest first):
the engine fills its caches with them at load, so the first requests already hit.

The weights are random (no training: the demo is about placement, not predictions). Tables are
drawn uniform with numpy (5x faster than normal draws here), chunk by chunk straight into their
final arrays; an nnx init would draw each whole table with jax.random and hold a second copy
while it scales it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

LARGE_TABLE_GIB = 4.0  # `--demo-table-gib`'s default
# Shares of the table bytes: 3 huge, 5 medium and 18 small tables (a geometric tail), normalized.
HUGE_SHARES: tuple[float, ...] = (0.45, 0.28, 0.17)
MEDIUM_SHARES: tuple[float, ...] = (0.035, 0.025, 0.015, 0.01, 0.006)
SMALL_SHARES: tuple[float, ...] = tuple(2e-3 * 0.55**i for i in range(18))
MIN_ROWS = 3
ZIPF_EXPONENT = 1.2  # of `skewed_ids`: the top 1% of a 30M-row table gets 93% of its lookups
MISSING_FRACTION = 0.02  # of `skewed_ids`: ids sent as -1 (a missing feature)
HOT_ROWS_FILE = "hot_rows.npz"  # serving/engines/cached/engine.py reads it (HOT_ROWS_FILE)
# Rows listed per huge and medium table: warms caches of up to 1/16 of each (512MiB on the
# 4 GiB model caches 3% of the huge ones).
HOT_ROWS_FRACTION = 1 / 16
CHUNK_BYTES = 64 << 20  # generated at a time
BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # demo.repository.ROW_BUCKETS
TINY_BUCKETS: tuple[int, ...] = (1, 8, 64)


@dataclasses.dataclass(frozen=True, slots=True)
class LargeTablesConfig:
  """The large-table DLRM: its table bytes (rows follow from the shares) and small MLPs, so a
  batch costs little compute and the lookups dominate."""

  table_bytes: int = int(LARGE_TABLE_GIB * 2**30)
  embed_dim: int = 16
  bottom_mlp: tuple[int, ...] = (32, 16)
  top_mlp: tuple[int, ...] = (64, 32, 1)
  buckets: tuple[int, ...] = BUCKETS
  seed: int = 0

  def __post_init__(self):
    n = len(HUGE_SHARES) + len(MEDIUM_SHARES) + len(SMALL_SHARES)
    if self.embed_dim < 1 or self.table_bytes < n * MIN_ROWS * self.row_bytes:
      raise ValueError(f"{self.table_bytes=} must hold {n} tables of at least {MIN_ROWS} rows of"
                       f" {self.embed_dim=} floats")
    if self.bottom_mlp[-1] != self.embed_dim:
      raise ValueError(f"bottom_mlp {self.bottom_mlp} must end in {self.embed_dim=}")

  @classmethod
  def demo(cls, table_gib: float = LARGE_TABLE_GIB) -> LargeTablesConfig:
    """`table_gib` GiB of float32 tables at 16 floats a row (4 GiB: 67M rows, 3 of 30M-11M)."""
    if not table_gib > 0:
      raise ValueError(f"table_gib must be > 0, got {table_gib}")
    return cls(table_bytes=int(table_gib * 2**30))

  @classmethod
  def tiny(cls) -> LargeTablesConfig:
    """The same shape in 4 MiB (the largest table 59k rows of 8 floats), for tests."""
    return cls(table_bytes=4 << 20, embed_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1),
               buckets=TINY_BUCKETS)

  @property
  def row_bytes(self) -> int:
    return 4 * self.embed_dim

  @property
  def table_sizes(self) -> tuple[int, ...]:
    """Rows per feature, largest first: `table_bytes` split by the shares."""
    shares = np.array(HUGE_SHARES + MEDIUM_SHARES + SMALL_SHARES)
    rows = self.table_bytes // self.row_bytes * shares / shares.sum()
    return tuple(max(MIN_ROWS, int(r)) for r in rows)

  @property
  def cacheable(self) -> tuple[int, ...]:
    """The features a budget would cache first (huge and medium): those `hot_rows.npz` lists."""
    return tuple(range(len(HUGE_SHARES) + len(MEDIUM_SHARES)))

  def dlrm(self) -> Any:
    """The models.dlrm.DLRMConfig of this shape."""
    from models.dlrm import DLRMConfig

    return DLRMConfig(table_sizes=self.table_sizes, embed_dim=self.embed_dim,
                      bottom_mlp=self.bottom_mlp, top_mlp=self.top_mlp)


def _size(nbytes: float) -> str:
  """4.00 GiB, or 4.0 MiB below a tenth of a GiB."""
  return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 / 10 else f"{nbytes / 2**20:.1f} MiB"


def _stride(rows: int) -> int:
  """A multiplier coprime to `rows` near rows / golden ratio: rank -> row is a permutation."""
  s = max(1, int(rows * 0.6180339887))
  while math.gcd(s, rows) != 1:
    s += 1
  return s


def rank_to_row(ranks: np.ndarray, rows: int) -> np.ndarray:
  """The table rows of id ranks (0: the most frequent id); a permutation of 0..rows-1."""
  return (np.asarray(ranks, np.int64) % rows) * _stride(rows) % rows


def hot_rows(rows: int, n: int) -> np.ndarray:
  """The `n` hottest rows of a table of `rows` rows under `skewed_ids`, hottest first."""
  return rank_to_row(np.arange(min(n, rows)), rows)


def skewed_ids(rng: np.random.Generator, table_sizes: tuple[int, ...], n: int, *,
               exponent: float = ZIPF_EXPONENT,
               missing: float = MISSING_FRACTION) -> np.ndarray:
  """Demo traffic: [n, F] int64 ids, each feature's rank Zipf-distributed (folded into its
  table), mapped by `rank_to_row`; a `missing` fraction of them -1."""
  ids = np.empty((n, len(table_sizes)), np.int64)
  for f, rows in enumerate(table_sizes):
    ids[:, f] = rank_to_row(rng.zipf(exponent, n) - 1, rows)
  ids[rng.random(ids.shape) < missing] = -1
  return ids


def random_table(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
  """[rows, dim] float32, uniform with the variance of `models.embedding.make_tables`' normal
  init (1 / dim), generated in place `CHUNK_BYTES` at a time (no second copy)."""
  out = np.empty((rows, dim), np.float32)
  width = np.float32(2 * math.sqrt(3.0 / dim))
  step = max(1, CHUNK_BYTES // (4 * dim))
  for start in range(0, rows, step):
    part = out[start:start + step]
    rng.random(out=part, dtype=np.float32)
    part -= np.float32(0.5)
    part *= width
  return out


def large_dlrm(config: LargeTablesConfig, say: Progress) -> Any:
  """The DLRM with generated tables: nnx initializes the MLPs (and one-row tables), then each
  table param is replaced by its numpy array, which the exporter writes as it is."""
  from flax import nnx

  from models.dlrm import DLRM
  from models.embedding import TABLE_AXES

  cfg = config.dlrm()
  model = DLRM(dataclasses.replace(cfg, table_sizes=(1,) * cfg.num_sparse),
               rngs=nnx.Rngs(config.seed))
  model.config = cfg
  t0 = time.perf_counter()
  for f, rows in enumerate(cfg.table_sizes):
    t1 = time.perf_counter()
    table = random_table(rows, cfg.embed_dim, np.random.default_rng([config.seed, f]))
    model.tables[f"t{f:02d}"] = nnx.Param(table, logical_axes=TABLE_AXES)
    if table.nbytes >= 256 << 20:
      say(f"dlrm_large: table t{f:02d} generated ({rows:,} rows, {table.nbytes / 2**30:.2f}"
          f" GiB) in {time.perf_counter() - t1:.1f}s")
  say(f"dlrm_large: {cfg.num_sparse} tables ({_size(config.table_bytes)}) generated"
      f" in {time.perf_counter() - t0:.1f}s")
  return model


def hot_rows_of(config: LargeTablesConfig) -> dict[str, np.ndarray]:
  """`hot_rows.npz`'s contents: table param path -> its hottest rows, for the cacheable ones."""
  sizes = config.table_sizes
  return {f"tables/t{f:02d}": hot_rows(sizes[f], max(1, int(sizes[f] * HOT_ROWS_FRACTION)))
          for f in config.cacheable}


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_dlrm_large(repository: pathlib.Path, *, tiny: bool = False,
                     platforms: tuple[str, ...] = ("cpu",), progress: Progress | None = None,
                     table_gib: float = LARGE_TABLE_GIB) -> pathlib.Path:
  """Exports `<repository>/dlrm_large/1`: the large-table DLRM (`LargeTablesConfig.demo
  (table_gib)`, with `tiny` 4 MiB) and its `hot_rows.npz`; deterministic."""
  import export

  say = progress or (lambda msg: logger.info("%s", msg))
  config = LargeTablesConfig.tiny() if tiny else LargeTablesConfig.demo(table_gib)
  sizes = config.table_sizes
  huge = sum(sizes[:len(HUGE_SHARES)]) / sum(sizes)
  say(f"dlrm_large: generating {len(sizes)} float32 tables, {_size(config.table_bytes)}"
      f" ({sum(sizes):,} rows of {config.embed_dim}; the {len(HUGE_SHARES)} largest hold"
      f" {huge:.0%}) ...")
  model = large_dlrm(config, say)
  version = pathlib.Path(repository) / "dlrm_large" / "1"
  version.mkdir(parents=True, exist_ok=True)  # the manifest, written last, completes it
  np.savez(version / HOT_ROWS_FILE, **hot_rows_of(config))
  say(f"dlrm_large: exporting {len(config.buckets)} batch buckets and writing the"
      f" {_size(config.table_bytes)} checkpoint (about 10 s a GiB on 2 cores) ...")
  t0 = time.perf_counter()
  cfg = config.dlrm()
  path = export.export_model(
      model, repository=repository, name="dlrm_large", version=1,
      inputs=[export.Input("dense", "float32", ("batch", cfg.num_dense)),
              export.Input("sparse", "int64", ("batch", cfg.num_sparse))],
      config=export.ExportConfig(batch_buckets=config.buckets, max_queue_delay_us=1000,
                                 platforms=platforms),
      extra={"description": f"DLRM with {_size(config.table_bytes)} of generated"
             f" embedding tables ({len(HUGE_SHARES)} huge, {len(MEDIUM_SHARES)} medium,"
             f" {len(SMALL_SHARES)} small), random weights; serve it under"
             " --embedding-device-budget (demo/large_tables.py)",
             "table_sizes": list(sizes), "seed": config.seed,
             "traffic": {"zipf_exponent": ZIPF_EXPONENT, "missing_fraction": MISSING_FRACTION}})
  say(f"dlrm_large: bundle written in {time.perf_counter() - t0:.1f}s"
      f" ({_size(_disk_bytes(path))} on disk)")
  return path
