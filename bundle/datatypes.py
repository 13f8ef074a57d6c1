"""The one datatype table: KServe v2 / Triton wire names, manifest (numpy) names, Triton
model-config enum names and the typed-contents field of each, plus numpy dtype lookups."""

from __future__ import annotations

import dataclasses
import functools

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class Datatype:
  """One tensor datatype under every name the server meets it by."""

  triton: str  # wire name in ModelInfer and metadata, e.g. "FP32"
  numpy: str  # manifest dtype name, e.g. "float32" ("object" for BYTES)
  config_type: str  # Triton model_config.DataType enum name, e.g. "TYPE_FP32"
  contents_field: str | None  # InferTensorContents field for typed values; None: raw bytes only


DATATYPES: tuple[Datatype, ...] = (
    Datatype("BOOL", "bool", "TYPE_BOOL", "bool_contents"),
    Datatype("UINT8", "uint8", "TYPE_UINT8", "uint_contents"),
    Datatype("UINT16", "uint16", "TYPE_UINT16", "uint_contents"),
    Datatype("UINT32", "uint32", "TYPE_UINT32", "uint_contents"),
    Datatype("UINT64", "uint64", "TYPE_UINT64", "uint64_contents"),
    Datatype("INT8", "int8", "TYPE_INT8", "int_contents"),
    Datatype("INT16", "int16", "TYPE_INT16", "int_contents"),
    Datatype("INT32", "int32", "TYPE_INT32", "int_contents"),
    Datatype("INT64", "int64", "TYPE_INT64", "int64_contents"),
    Datatype("FP16", "float16", "TYPE_FP16", None),
    Datatype("FP32", "float32", "TYPE_FP32", "fp32_contents"),
    Datatype("FP64", "float64", "TYPE_FP64", "fp64_contents"),
    Datatype("BF16", "bfloat16", "TYPE_BF16", None),
    Datatype("BYTES", "object", "TYPE_STRING", "bytes_contents"),
)
BY_TRITON: dict[str, Datatype] = {d.triton: d for d in DATATYPES}
BY_NUMPY: dict[str, Datatype] = {d.numpy: d for d in DATATYPES}


@functools.lru_cache(maxsize=None)
def numpy_dtype(name: str) -> np.dtype:
  """The numpy dtype of a manifest dtype name ("bfloat16" through ml_dtypes)."""
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def triton_datatype(dt: np.dtype) -> str:
  """The wire datatype name of a numpy dtype (KeyError for one the protocol lacks)."""
  return BY_NUMPY["bfloat16" if dt == ml_dtypes.bfloat16 else str(dt)].triton
