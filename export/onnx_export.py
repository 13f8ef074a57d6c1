"""ONNX model -> xlaserve bundle, through `jaxonnxruntime` (ONNX graph -> a JAX function).

The ONNX graph's initializers become the bundle's params (arguments of the artifact, not
constants); its inputs' first dimension is the batch (a `dim_param` or any size), the others
must be fixed. The function is written by `export.export_model` like a Flax model's, so the
server never needs onnx or jaxonnxruntime. An operator jaxonnxruntime has no handler for
fails the export naming it, before anything is written.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from export.config import ExportConfig, Input
from export.exporter import export_model
from export.torch.ops import UnsupportedOperatorError

logger = logging.getLogger(__name__)


def _inputs(graph: Any) -> list[Input]:
  """The served inputs of an ONNX graph (graph inputs that are not initializers)."""
  import onnx

  init = {t.name for t in graph.initializer}
  out = []
  for vi in graph.input:
    if vi.name in init:
      continue
    t = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if not dims or any(d is None for d in dims[1:]):
      raise ValueError(f"ONNX input {vi.name!r} has shape {dims}: the first dimension is the"
                       " batch and every other must be fixed")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
    out.append(Input(vi.name, dtype, ("batch", *dims[1:])))
  return out


def export_onnx(
    model: str | os.PathLike[str] | Any,
    *,
    repository: str | os.PathLike[str],
    name: str,
    version: int | None = None,
    output_names: Sequence[str] | None = None,
    config: ExportConfig = ExportConfig(),
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `<repository>/<name>/<version>/` from an ONNX file (or `onnx.ModelProto`).

  Outputs keep the graph's output names unless `output_names` renames them, in order.
  """
  import jaxonnxruntime
  import onnx
  from jaxonnxruntime.call_onnx import call_onnx_model

  proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
  inputs = _inputs(proto.graph)
  names = list(output_names) if output_names else [o.name for o in proto.graph.output]
  # jaxonnxruntime traces once on sample inputs to fix static attributes; zeros of batch 2.
  sample = {i.name: np.zeros((2, *i.shape[1:]), i.dtype) for i in inputs}
  try:
    fn, onnx_params = call_onnx_model(proto, sample)
  except NotImplementedError as e:
    raise UnsupportedOperatorError(
        f"ONNX model: no lowering in jaxonnxruntime {jaxonnxruntime.__version__}: {e}") from e

  def apply(params: Mapping[str, Any], ins: Mapping[str, Any]) -> dict[str, Any]:
    outs = fn(params, dict(ins))
    if len(outs) != len(names):
      raise ValueError(f"the graph has {len(outs)} outputs but output names {names}")
    return dict(zip(names, outs))

  params = {k: jnp.asarray(v) for k, v in onnx_params.items()}
  info = {"source": "onnx", "onnx_opset": [o.version for o in proto.opset_import],
          "converter": f"jaxonnxruntime {jaxonnxruntime.__version__}", **(extra or {})}
  return export_model(apply, params=params, repository=repository, name=name, version=version,
                      inputs=inputs, config=config, extra=info)
