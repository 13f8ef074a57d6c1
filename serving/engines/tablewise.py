"""Table-wise (`embedding_tables`) serving of an exported bundle: fused lookup, then the rest.

A signature's StableHLO takes every table as its own param, so it cannot take tables fused
into per-device blocks. Bundles of models with categorical tables also carry the signature
from looked-up embeddings (`bundle.TableLookup`). Here the tables, restored onto their
home devices, are fused into one row-sharded array (`sharding.TablePlacement.fuse`), and each
bucket's jitted function composes `TablePlacement.lookup` (each device gathers its own tables'
rows, then one all-gather of the [B, F, D] activations) with that artifact. No model code.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

from bundle import BundleError, Manifest, Signature, TableLookup

logger = logging.getLogger(__name__)


def require_lookup(manifest: Manifest, strategy: str) -> None:
  """Raises BundleError unless every signature can be served table-wise (old bundles cannot)."""
  missing = sorted(k for k, s in manifest.signatures.items() if s.table_lookup is None)
  if missing:
    raise BundleError(
        f"{manifest.name}: strategy {strategy!r} needs the from-embeddings artifact that bundles"
        f" of models with categorical tables carry, and signature(s) {missing} have none: re-export"
        " the model with this xlaserve (models built on models.embedding.CategoricalEmbeddings,"
        " default signature), or serve it with embedding_rows")


class TableWise:
  """One replica's table-wise layout: which restored leaves fuse, and the composed step."""

  def __init__(self, signature: Signature, tables: Any, mesh: Any, where: str = ""):
    lookup = signature.table_lookup
    if lookup is None:
      raise BundleError(f"{where}: signature {signature.name!r} has no table_lookup; re-export")
    if tuple(tables.leaf_index) != tuple(lookup.tables):
      raise BundleError(
          f"{where}: the sharding plan orders tables {tuple(tables.leaf_index)} but the bundle's"
          f" lookup reads {tuple(lookup.tables)}; serve it with embedding_rows")
    if tables.side and any(set(s) != {lookup.scales[f], lookup.offsets[f]}
                           for f, s in enumerate(tables.side)):
      raise BundleError(f"{where}: the plan's per-row arrays {tables.side} are not the bundle's"
                        " scales and offsets")
    if bool(tables.side) != bool(lookup.scales):
      raise BundleError(f"{where}: 8-bit tables' scales/offsets and the plan disagree")
    self.lookup: TableLookup = lookup
    self.tables = tables
    self.mesh = mesh
    logger.info("%s: %d tables on %d devices, rows per device %s (block %d rows)", where,
                len(lookup.tables), tables.num_shards, tables.shard_rows(), tables.block_rows)

  def fuse(self, params: Sequence[Any], shardings: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Restored leaves -> (non-table leaves, then the fused tables [, scales, offsets])."""
    skip = self.lookup.table_leaves
    out = [p for i, p in enumerate(params) if i not in skip]
    out_sh = [s for i, s in enumerate(shardings) if i not in skip]
    groups = [self.lookup.tables]
    if self.lookup.scales:
      groups += [self.lookup.scales, self.lookup.offsets]
    for group in groups:
      fused = self.tables.fuse([params[i] for i in group], self.mesh)
      out.append(fused)
      out_sh.append(fused.sharding)
    # The restored tables are dropped with `params` (a block may share a table's buffer).
    return out, out_sh

  def step(self, exported: Any) -> Callable[[list[Any], Mapping[str, Any]], Any]:
    """`fn(params, inputs)` as `fuse` lays params out; inputs are the signature's."""
    lookup, tables, mesh = self.lookup, self.tables, self.mesh
    n_fused = 3 if lookup.scales else 1

    def fn(params: list[Any], inputs: Mapping[str, Any]) -> Any:
      dense, fused = params[:-n_fused], params[-n_fused:]
      side = {"scale": fused[1], "offset": fused[2]} if lookup.scales else {}
      ins = dict(inputs)
      ins[lookup.embeddings_input] = tables.lookup(fused[0], ins.pop(lookup.ids_input), mesh,
                                                   **side)
      return exported.call(list(dense), ins)

    return fn
