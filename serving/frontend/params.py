"""Live row updates of a served model's params (an xlaserve extension over KServe v2 tensors).

A request names `rows` (INT64 [M]) and, per param leaf to change, a tensor named by the leaf's
path in the manifest, of shape [M, *leaf.shape[1:]]: row r of the leaf becomes that tensor's
row. Every leaf of one request changes at once between batches (a batch sees all of it or none
of it): e.g. adding, removing or replacing ads in a retrieval index held as params.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bundle import Manifest, TensorSpec
from serving.frontend import codec
from serving.types import Code, ServingError

ROWS = "rows"


def update_specs(manifest: Manifest, names: list[str]) -> list[TensorSpec]:
  """The tensors an update request naming `names` must carry: `rows` and those leaves."""
  leaves = {p.path: p for p in manifest.params}
  unknown = sorted(n for n in names if n != ROWS and n not in leaves)
  if unknown:
    raise ServingError(Code.INVALID_ARGUMENT, f"{manifest.name} has no param leaves {unknown};"
                       f" its leaves: {sorted(leaves)}")
  specs = [TensorSpec(ROWS, "int64", (-1,), ("batch",))]
  for n in names:
    if n != ROWS:
      p = leaves[n]
      if not p.shape:
        raise ServingError(Code.INVALID_ARGUMENT, f"param leaf {n!r} is a scalar: no rows")
      specs.append(TensorSpec(n, p.dtype, (-1, *p.shape[1:]),
                              ("batch",) + (None,) * (len(p.shape) - 1)))
  if len(specs) == 1:
    raise ServingError(Code.INVALID_ARGUMENT, "name at least one param leaf to update beside"
                       " 'rows'")
  return specs


def apply_update(runner: Any, manifest: Manifest, request: Any, limits: codec.Limits,
                 compiles: Any) -> tuple[int, int]:
  """Decodes and applies one update (blocking; run it off the event loop). Returns (rows,
  generation); raises ServingError (INVALID_ARGUMENT for a bad request)."""
  update = getattr(runner, "update_rows", None)
  if update is None:
    raise ServingError(Code.INVALID_ARGUMENT, f"model {manifest.name!r} has no params that can"
                       " be updated while serving")
  specs = update_specs(manifest, [t.name for t in request.inputs])
  arrays, rows = codec.decode_inputs(request, specs, limits)
  values: Mapping[str, np.ndarray] = {k: v for k, v in arrays.items() if k != ROWS}
  try:
    with compiles.warming():  # a scatter compiled for a new size is not a request's compile
      return rows, update(arrays[ROWS], values)
  except ValueError as e:
    raise ServingError(Code.INVALID_ARGUMENT, f"model {manifest.name!r}: {e}") from None
