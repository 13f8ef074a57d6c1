"""`export_torch`: a PyTorch model (or a `torch.export` program) -> an ordinary xlaserve bundle.

The model is captured with `torch.export` (capture.py), lowered to a JAX function by our ATen op
table (ops.py, lower.py) and written by `export.export_model`, the same path as a Flax model:
params in orbax, StableHLO per platform with a symbolic batch, the manifest. Serving it needs
neither torch nor this package.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from export.config import ExportConfig
from export.exporter import export_model
from export.torch.capture import Program, capture, program
from export.torch.lower import lowered

logger = logging.getLogger(__name__)


def torch_program(model: Any, example_inputs: Sequence[Any] | None = None, *,
                  seq_dims: Mapping[str, int] | None = None,
                  max_seq: int | None = None) -> Program:
  """The lowerable `Program` of a `torch.nn.Module` (captured on `example_inputs`; `seq_dims`
  as `capture`) or of an `ExportedProgram` (e.g. `torch.export.load("model.pt2")`, captured
  with a dynamic batch, and a dynamic dimension for any sequence)."""
  import torch

  if isinstance(model, torch.export.ExportedProgram):
    if example_inputs is not None:
      raise ValueError("example_inputs are for a module; an ExportedProgram is already captured")
    return program(model)
  if not isinstance(model, torch.nn.Module):
    raise TypeError(f"model must be a torch.nn.Module or an ExportedProgram, got {type(model)}")
  if example_inputs is None:
    raise ValueError("example_inputs are needed to capture a torch.nn.Module")
  return program(capture(model, example_inputs, seq_dims=seq_dims, max_seq=max_seq))


def export_torch(
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    *,
    repository: str | os.PathLike[str],
    name: str,
    version: int | None = None,
    output_names: Sequence[str] | None = None,
    seq_dims: Mapping[str, int] | None = None,
    config: ExportConfig = ExportConfig(),
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `<repository>/<name>/<version>/` from a torch model and returns its path.

  Inputs are named after `forward`'s arguments; their first dimension is the batch (bucketed),
  the others are fixed at the example's sizes except `seq_dims` (argument name -> dimension),
  which vary up to the largest of `config.seq_buckets` and are served at those buckets. Outputs are named by `output_names` (default
  "output", or "output_<i>" for several). Raises `UnsupportedOperatorError` naming every
  operator the translator cannot lower, before anything is written.
  """
  if seq_dims and not config.seq_buckets:
    raise ValueError("seq_dims needs ExportConfig.seq_buckets (the lengths to serve at)")
  prog = torch_program(model, example_inputs, seq_dims=seq_dims,
                       max_seq=max(config.seq_buckets) if seq_dims else None)
  params = {k: jnp.asarray(v) for k, v in prog.params.items()}
  info = {"source": "torch", "torch_version": prog.torch_version,
          "embedding_bags_on_kernel": prog.bag_rewrites, **(extra or {})}
  logger.info("exporting torch program %s: %d params, inputs %s", name, len(params),
              [i.name for i in prog.inputs])
  return export_model(lowered(prog, output_names), params=params, repository=repository,
                      name=name, version=version, inputs=list(prog.inputs), config=config,
                      extra=info)
