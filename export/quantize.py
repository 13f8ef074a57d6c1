"""Quantization chosen at export time: an NNX module transformation applied before params are flattened.

Names (`ExportConfig(quantization=...)`) are "<dense>", "<tables>" or "<dense>+<tables>":

  none                  float32 everywhere (the model unchanged)
  int8                  Dense kernels int8, one float32 scale per output channel; activations stay
                        float (quantized_matmul "w8a16", weight-only)
  int8_act              as int8, and each layer's input is quantized per row to int8 inside the
                        matmul (int8 x int8 -> int32, quantized_matmul "w8a8")
  fp8                   Dense kernels float8_e4m3fn, one float32 scale per output channel
  int8_tables           embedding tables row-wise 8-bit: int8 codes [rows, D] with a float32 scale and
                        offset per row, looked up through embedding_bag with scale/offset; dense part float
  <dense>+int8_tables   both, e.g. "int8+int8_tables"

Dense layers are `models.layers.Dense` (switched in place with `Dense.quantize`); tables are the
2-D float params whose first logical axis is "table_rows", replaced by `models.embedding.QuantizedTable`
(the model must read them through `models.embedding.table_arrays`). Biases stay float32.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# Export name of a dense-part choice -> `quantized_matmul` mode.
DENSE_MODES: dict[str, str] = {"int8": "w8a16", "int8_act": "w8a8", "fp8": "fp8"}
TABLE_MODES: tuple[str, ...] = ("int8_tables",)
QUANTIZATIONS: tuple[str, ...] = (
    "none", *DENSE_MODES, *TABLE_MODES,
    *(f"{d}+{t}" for d in DENSE_MODES for t in TABLE_MODES),
)


@dataclasses.dataclass(frozen=True, slots=True)
class QuantizationSpec:
  """What one quantization name does: the Dense kernels' matmul mode and whether tables are 8-bit."""

  dense: str = "none"  # "none" or a quantized_matmul mode ("w8a16", "w8a8", "fp8")
  tables: bool = False
  table_dtype: str = "int8"

  @classmethod
  def parse(cls, name: str) -> QuantizationSpec:
    """Parses one of QUANTIZATIONS; raises ValueError listing them for anything else."""
    if name not in QUANTIZATIONS:
      raise ValueError(f"quantization={name!r} must be one of {QUANTIZATIONS}")
    parts = name.split("+")
    dense = next((DENSE_MODES[p] for p in parts if p in DENSE_MODES), "none")
    return cls(dense=dense, tables=any(p in TABLE_MODES for p in parts))


def _is_table(var: Any) -> bool:
  from flax import nnx

  if not isinstance(var, nnx.Variable):
    return False
  axes = var.get_metadata().get("logical_axes")
  value = var[...]
  return (axes is not None and len(axes) == 2 and axes[0] == "table_rows" and value.ndim == 2
          and jnp.issubdtype(value.dtype, jnp.floating))


def _get(node: Any, key: Any) -> Any:
  from flax import nnx

  return node[key] if isinstance(node, (nnx.List, nnx.Dict)) else getattr(node, key)


def _set(node: Any, key: Any, value: Any) -> None:
  from flax import nnx

  if isinstance(node, (nnx.List, nnx.Dict)):
    node[key] = value
  else:
    setattr(node, key, value)


def quantize_model(model: Any, mode: str, *, impl: str = "auto") -> Any:
  """A copy of NNX `model` quantized as `mode` says (the input is left unchanged).

  Raises ValueError if `mode` would change nothing (no `models.layers.Dense`, or no table).
  """
  from flax import nnx

  from models.embedding import QuantizedTable
  from models.layers import Dense

  spec = QuantizationSpec.parse(mode)
  if mode == "none":
    return model
  out = nnx.clone(model)
  nodes = list(nnx.iter_graph(out))
  dense = [n for _, n in nodes if isinstance(n, Dense) and n.quantization == "none"]
  tables = [(p, n) for p, n in nodes if _is_table(n)]
  if spec.dense != "none":
    if not dense:
      raise ValueError(f"quantization={mode!r}: the model has no models.layers.Dense to quantize")
    for layer in dense:
      layer.quantize(spec.dense, impl=impl)
  if spec.tables:
    if not tables:
      raise ValueError(f"quantization={mode!r}: the model has no ('table_rows', ...) tables")
    for path, var in tables:
      parent = out
      for key in path[:-1]:
        parent = _get(parent, key)
      axes = tuple(var.get_metadata()["logical_axes"])
      _set(parent, path[-1], QuantizedTable.from_table(var[...], axes=axes,
                                                       dtype=jnp.dtype(spec.table_dtype)))
  logger.info("quantized %s: %d dense layers (%s), %d tables", mode,
              len(dense) if spec.dense != "none" else 0, spec.dense,
              len(tables) if spec.tables else 0)
  return out


def dequantize_model(model: Any) -> Any:
  """A float32 copy of a quantized model, with the float model's param names and shapes."""
  from flax import nnx

  from models.embedding import QuantizedTable
  from models.layers import Dense

  out = nnx.clone(model)
  nodes = list(nnx.iter_graph(out))
  for _, n in nodes:
    if isinstance(n, Dense):
      n.dequantize()
  for path, n in nodes:
    if isinstance(n, QuantizedTable) and path:
      parent = out
      for key in path[:-1]:
        parent = _get(parent, key)
      _set(parent, path[-1], nnx.Param(n.dequantized(), logical_axes=n.axes))
  return out


def quantize_for_export(model: Any, mode: str) -> Any:
  """Returns the model with its params quantized as `mode` says ("none": unchanged)."""
  QuantizationSpec.parse(mode)
  return model if mode == "none" else quantize_model(model, mode)


def param_bytes(model: Any) -> dict[str, int]:
  """Bytes of a model's params: "embeddings" (anything with a "table_rows" axis), "dense", "total"."""
  from flax import nnx

  out = {"embeddings": 0, "dense": 0}
  for _, var in nnx.iter_graph(model):
    if not isinstance(var, nnx.Variable):
      continue
    value = var[...]
    nbytes = int(np.prod(value.shape)) * jnp.dtype(value.dtype).itemsize
    axes = var.get_metadata().get("logical_axes") or ()
    out["embeddings" if "table_rows" in axes else "dense"] += nbytes
  out["total"] = out["embeddings"] + out["dense"]
  return out
