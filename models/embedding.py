"""Categorical-feature embedding lookups shared by the CTR models (DLRM, DCN-v2).

Lookups run through `pallas_kernels.embedding_bag_multi` (impl "auto": the Triton kernel on
CUDA, the jnp reference elsewhere) for float tables and for row-wise 8-bit tables alike.
A model keeps each table as an `nnx.Param` [rows, D] with axes ("table_rows", "embed");
`export.quantize` may swap it for a `QuantizedTable`, so read tables through `table_arrays`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import kernel_impl
from pallas_kernels import embedding_bag_multi
from pallas_kernels.quantize import dequantize_rows, quantize_rows_int8

TABLE_AXES: tuple[str, str] = ("table_rows", "embed")


class QuantizedTable(nnx.Module):
  """A row-wise 8-bit embedding table: codes [rows, D] with table ~= codes * scale + offset per row.

  Params: `codes` (int8 or uint8, the float table's axes), `scale` and `offset` [rows] float32
  (axes (rows_axis,)). A row's min and max land exactly on the extreme codes.
  """

  def __init__(self, codes: jax.Array, scale: jax.Array, offset: jax.Array, *,
               axes: tuple[str, str] = TABLE_AXES):
    if codes.ndim != 2 or scale.shape != codes.shape[:1] or offset.shape != codes.shape[:1]:
      raise ValueError(f"{codes.shape=} must be [rows, D], {scale.shape=} and {offset.shape=} [rows]")
    self.codes = nnx.Param(codes, logical_axes=tuple(axes))
    self.scale = nnx.Param(scale.astype(jnp.float32), logical_axes=(axes[0],))
    self.offset = nnx.Param(offset.astype(jnp.float32), logical_axes=(axes[0],))

  @classmethod
  def from_table(cls, table: jax.Array, *, axes: tuple[str, str] = TABLE_AXES,
                 dtype: jnp.dtype = jnp.int8) -> QuantizedTable:
    """Quantizes a float table [rows, D] row by row (`quantize_rows_int8`)."""
    codes, scale, offset = quantize_rows_int8(table, dtype)
    return cls(codes, scale, offset, axes=axes)

  @property
  def axes(self) -> tuple[str, str]:
    return tuple(self.codes.get_metadata()["logical_axes"])

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.codes.shape)

  def dequantized(self) -> jax.Array:
    """The float32 table [rows, D] these codes stand for (inspection and round trips only)."""
    return dequantize_rows(self.codes[...], self.scale[...], self.offset[...])

  def __getitem__(self, index: Any) -> jax.Array:
    raise TypeError(
        "a QuantizedTable is not an array: read tables through models.embedding.table_arrays"
        " and pass its scales/offsets to lookup_embeddings")


def table_arrays(
    entries: Sequence[nnx.Param | QuantizedTable | jax.Array],
) -> tuple[list[jax.Array], list[jax.Array | None] | None, list[jax.Array | None] | None]:
  """(tables, scales, offsets) for `lookup_embeddings`; scales/offsets are None if all are float."""
  tables, scales, offsets = [], [], []
  for e in entries:
    if isinstance(e, QuantizedTable):
      tables.append(e.codes[...])
      scales.append(e.scale[...])
      offsets.append(e.offset[...])
    else:
      tables.append(e[...] if isinstance(e, nnx.Variable) else e)
      scales.append(None)
      offsets.append(None)
  if all(s is None for s in scales):
    return tables, None, None
  return tables, scales, offsets


def lookup_embeddings(
    tables: Sequence[jax.Array],
    ids: jax.Array,
    impl: str = "auto",
    *,
    scales: Sequence[jax.Array | None] | None = None,
    offsets: Sequence[jax.Array | None] | None = None,
) -> jax.Array:
  """One id per feature -> [B, F, D] float32; ids taken modulo rows, negative ids give zeros.

  tables[f] is [rows_f, D] float, or uint8/int8 with scales[f], offsets[f] [rows_f] (None for a
  float table). Runs `embedding_bag_multi` with bags of one id (`impl` as `layers.kernel_impl`
  resolves it: a symbolic batch, as in `export_model`, takes the reference).
  """
  ids = jnp.asarray(ids)  # [B, F] int32/int64
  if ids.ndim != 2 or ids.shape[1] != len(tables):
    raise ValueError(f"{ids.shape=} must be [batch, {len(tables)}] (one id per table)")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"{ids.dtype=} must be an integer type")
  if ids.dtype not in (jnp.dtype(jnp.int32), jnp.dtype(jnp.int64)):
    ids = ids.astype(jnp.int32)
  ids = jnp.where(ids < 0, -1, ids)  # any negative id is missing
  emb = embedding_bag_multi(list(tables), ids[:, :, None], combiner="sum", scales=scales,
                            offsets=offsets, impl=kernel_impl(impl, ids))  # [B, F, D]
  return emb.astype(jnp.float32)


def make_tables(table_sizes: Sequence[int], embed_dim: int, rngs: nnx.Rngs) -> nnx.Dict:
  """One float table per categorical feature, `t00`, `t01`, ..., axes ("table_rows", "embed")."""
  import numpy as np

  return nnx.Dict({
      f"t{f:02d}": nnx.Param(
          jax.random.normal(rngs.params(), (rows, embed_dim), jnp.float32)
          * (1.0 / np.sqrt(embed_dim)),
          logical_axes=("table_rows", "embed"),
      )
      for f, rows in enumerate(table_sizes)
  })


class CategoricalEmbeddings:
  """Mixin for CTR models holding `self.tables` (from `make_tables`, maybe quantized) and a
  config with `num_sparse` and `embedding_impl`: one id per feature -> [B, F, D].

  A model computes `__call__(**inputs)` as `from_embeddings(embed(inputs[ids_input]), **rest)`,
  so the exporter can also export the part after the lookup (table-wise serving looks the
  embeddings up itself, from tables on different devices).
  """

  ids_input: str = "sparse"  # the input holding the [B, F] ids

  def from_embeddings(self, embeddings: jax.Array, **inputs: jax.Array) -> dict[str, jax.Array]:
    """The model's outputs from looked-up embeddings [B, F, D] float32 and its other inputs."""
    raise NotImplementedError(f"{type(self).__name__} must define from_embeddings")

  def table_param_paths(self) -> list[dict[str, str]]:
    """Per feature, the '/'-joined param paths (as `export` names leaves) of its table:
    {"table": ...} for a float table; 8-bit tables add "scale" and "offset"."""
    out = []
    for k in self.table_names():
      if isinstance(self.tables[k], QuantizedTable):
        out.append({"table": f"tables/{k}/codes", "scale": f"tables/{k}/scale",
                    "offset": f"tables/{k}/offset"})
      else:
        out.append({"table": f"tables/{k}"})
    return out

  def table_names(self) -> list[str]:
    return [f"t{f:02d}" for f in range(self.config.num_sparse)]

  def table_list(self) -> list[jax.Array]:
    """Float view of the tables (8-bit tables dequantized): for inspection, not the serving path."""
    return [t.dequantized() if isinstance(t, QuantizedTable) else t[...]
            for t in (self.tables[k] for k in self.table_names())]

  def embed(self, sparse: jax.Array) -> jax.Array:
    """sparse [B, F] ids -> [B, F, D] float32, through the embedding-bag kernel dispatcher."""
    tables, scales, offsets = table_arrays([self.tables[k] for k in self.table_names()])
    return lookup_embeddings(tables, sparse, self.config.embedding_impl, scales=scales,
                             offsets=offsets)
