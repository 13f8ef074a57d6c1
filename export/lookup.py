"""The table-lookup artifact: a model with categorical tables, exported from looked-up embeddings.

Table-wise serving looks the embeddings up itself (sharding.TablePlacement) and then runs
`model.from_embeddings` on the params without the tables; this module writes that artifact
beside a signature and the `TableLookup` contract the manifest records.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bundle as bundle_lib
from bundle import ParamSpec, TableLookup, TensorSpec
from export.config import ExportConfig
from export.tracing import as_output_dict, disabled_checks

logger = logging.getLogger(__name__)


def table_split(model: Any, specs: Sequence[ParamSpec]) -> TableLookup | None:
  """The lookup contract of a model with categorical tables (artifacts still empty), else None."""
  if not (hasattr(model, "table_param_paths") and hasattr(model, "from_embeddings")):
    return None
  index = {p.path: i for i, p in enumerate(specs)}
  features = model.table_param_paths()
  missing = sorted({path for f in features for path in f.values()} - set(index))
  if not features or missing:
    logger.warning("%s: table params %s not found; no from-embeddings artifact (table-wise"
                   " serving unavailable)", type(model).__name__, missing)
    return None
  tables = [index[f["table"]] for f in features]
  quantized = all("scale" in f for f in features)
  dims = {specs[i].shape[1] for i in tables}
  dtypes = {specs[i].dtype for i in tables}
  if len(dims) != 1 or len(dtypes) != 1 or (not quantized and any("scale" in f for f in features)):
    logger.warning("%s: tables differ in dim/dtype/quantization (%s, %s); no from-embeddings"
                   " artifact", type(model).__name__, sorted(dims), sorted(dtypes))
    return None
  return TableLookup(
      ids_input=model.ids_input, embeddings_input="embeddings", tables=tuple(tables),
      rows=tuple(specs[i].shape[0] for i in tables), dim=dims.pop(), table_dtype=dtypes.pop(),
      artifacts={},
      scales=tuple(index[f["scale"]] for f in features) if quantized else (),
      offsets=tuple(index[f["offset"]] for f in features) if quantized else ())


def export_from_embeddings(
    split: TableLookup, sig_name: str, in_specs: Sequence[TensorSpec], leaves: Sequence[Any],
    rebuild: Callable[[list[Any]], Any], output_names: Sequence[str] | None,
    config: ExportConfig, artifacts: dict[str, bytes],
) -> TableLookup:
  """Exports `model.from_embeddings` (params without the tables) beside signature `sig_name`."""
  names = [t.name for t in in_specs]
  if split.ids_input not in names or split.embeddings_input in names:
    raise ValueError(f"signature {sig_name!r} inputs {names} need {split.ids_input!r} and must not"
                     f" already have {split.embeddings_input!r}")
  skip = split.table_leaves
  kept = [i for i in range(len(leaves)) if i not in skip]
  param_structs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in kept]

  def fn(dense_leaves, ins):
    full: list[Any] = [None] * len(leaves)
    for i, x in zip(kept, dense_leaves):
      full[i] = x
    for i in skip:  # unused by from_embeddings; XLA drops them
      full[i] = jnp.zeros(leaves[i].shape, leaves[i].dtype)
    ins = dict(ins)
    emb = ins.pop(split.embeddings_input)
    return as_output_dict(rebuild(full).from_embeddings(emb, **ins), output_names)

  (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
  files = {}
  for platform in config.platforms:
    checks = disabled_checks(platform)
    for batch in config.batch_buckets if platform in ("cuda", "rocm") else (None,):
      n = b if batch is None else batch
      structs = {t.name: jax.ShapeDtypeStruct(
          (n, *t.shape[1:]), jnp.bfloat16 if t.dtype == "bfloat16" else np.dtype(t.dtype))
                 for t in in_specs if t.name != split.ids_input}
      structs[split.embeddings_input] = jax.ShapeDtypeStruct(
          (n, len(split.tables), split.dim), np.float32)
      exp = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(
          param_structs, structs)
      key = bundle_lib.artifact_key(platform, None, batch)
      fname = f"{sig_name}.from_embeddings.{key.replace('@', '.')}.jaxexport"
      artifacts[fname] = bytes(exp.serialize())
      files[key] = fname
  return dataclasses.replace(split, artifacts=files)
