"""Live row updates of a served model's params (an xlaserve extension over KServe v2 tensors).

A request names `rows` (INT64 [M]) and, per param leaf to change, a tensor named by the leaf's
path in the manifest, of shape [M, *leaf.shape[1:]]: row r of the leaf becomes that tensor's
row. Every leaf of one request changes at once between batches (a batch sees all of it or none
of it): e.g. adding, removing or replacing ads in a retrieval index held as params.

An update file (`NPZ_TYPE`: a numpy .npz, as `xlaserve update` sends it) may give each leaf its
own rows: arrays `<leaf>` and `rows:<leaf>` (or one shared `rows`). Embedding table leaves of a
model served with an embedding cache take ids there (hashed modulo the table's rows, new ids
too). Answers carry the `params_generation` that scored them once an update has been applied.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bundle import Manifest, TensorSpec
from serving.frontend import codec
from serving.types import Code, ServingError

ROWS = "rows"
NPZ_TYPE = "application/x-npz"
UPDATE_PARAMETER = "params_update"  # RepositoryModelLoad parameter (bytes): an update file


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
  _updater(runner, manifest)  # a model without params is refused before its tensors are read
  specs = update_specs(manifest, [t.name for t in request.inputs])
  arrays, rows = codec.decode_inputs(request, specs, limits)
  changes = {k: (arrays[ROWS], v) for k, v in arrays.items() if k != ROWS}
  return rows, apply_changes(runner, manifest, changes, compiles)[1]


def _updater(runner: Any, manifest: Manifest) -> Any:
  """The engine's `apply_update`; ServingError when the model has none."""
  update = getattr(getattr(runner, "engine", None), "apply_update", None)
  if update is None:
    raise ServingError(Code.INVALID_ARGUMENT, f"model {manifest.name!r} has no params that can"
                       " be updated while serving")
  return update


def decode_npz(body: bytes, manifest: Manifest, limits: codec.Limits
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """An update file's changes: leaf path -> (rows, values). Raises ServingError
  (INVALID_ARGUMENT) for a file that is not an .npz of plain arrays or names no leaf."""
  import io
  import zipfile

  try:
    with np.load(io.BytesIO(body), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ServingError(Code.INVALID_ARGUMENT, f"the update is not a readable .npz of arrays"
                       f" ({type(e).__name__}: {e}); write it with numpy.savez") from None
  too_big = [k for k, a in arrays.items() if a.nbytes > limits.max_tensor_bytes]
  if too_big:
    raise ServingError(Code.INVALID_ARGUMENT, f"arrays {too_big} exceed the tensor size limit")
  leaves = {p.path for p in manifest.params}
  names = [k for k in arrays if k != ROWS and not k.startswith(ROWS + ":")]
  unknown = sorted(set(names) - leaves)
  if unknown or not names:
    raise ServingError(Code.INVALID_ARGUMENT, f"{manifest.name}: the update names no param"
                       f" leaves {unknown or ''} (its leaves: {sorted(leaves)}); arrays are"
                       " named by leaf, with rows:<leaf> or rows")
  orphans = sorted(k for k in arrays if k.startswith(ROWS + ":") and k[5:] not in names)
  missing = [n for n in names if ROWS + ":" + n not in arrays and ROWS not in arrays]
  if orphans or missing:
    raise ServingError(Code.INVALID_ARGUMENT, f"rows for leaves not updated {orphans}, or no"
                       f" rows for {missing}")
  return {n: (arrays.get(ROWS + ":" + n, arrays.get(ROWS)), arrays[n]) for n in names}


def apply_changes(runner: Any, manifest: Manifest, changes: Mapping[str, tuple[Any, Any]],
                  compiles: Any) -> tuple[int, int]:
  """Applies decoded changes (blocking; run it off the event loop); returns (rows,
  generation). Raises ServingError (INVALID_ARGUMENT, nothing applied) for a bad update."""
  update = _updater(runner, manifest)
  try:
    with compiles.warming():  # a scatter compiled for a new size is not a request's compile
      generation = update(changes)
  except ValueError as e:
    raise ServingError(Code.INVALID_ARGUMENT, f"model {manifest.name!r}: {e}") from None
  return sum(int(np.size(r)) for r, _ in changes.values()), generation
