"""A torch model as a `Program` the translator lowers: `torch.export` capture, core ATen ops.

`capture` runs `torch.export.export` with a dynamic batch (the first dimension of every input)
and decomposes to the core ATen op set. `program` lifts the parameters, buffers and constant
tensors into numpy arrays keyed by their state names, names the inputs after `forward`'s
arguments, rewrites recognised embedding bags (bags.py) and checks that every operator has a
lowering, so an unsupported one fails here, naming it, before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from export.config import Input
from export.torch import bags
from export.torch.ops import UnsupportedOperatorError, aten_ops, op_name

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Program:
  """A captured program ready to lower: its FX graph (a private, rewritten copy), the lifted
  params by state name, which placeholder is which param or input, and the inputs to serve."""

  graph: Any  # torch.fx.Graph
  params: Mapping[str, np.ndarray]
  placeholders: Mapping[str, tuple[str, str]]  # node name -> ("param", key) | ("input", name)
  inputs: tuple[Input, ...]
  bag_rewrites: int
  torch_version: str


def capture(module: Any, example_inputs: Sequence[Any], *,
            seq_dims: Mapping[str, int] | None = None, max_seq: int | None = None) -> Any:
  """`torch.export` of `module` (in eval mode, no grad) with a dynamic first dimension on every
  input (`program` decomposes it). The example batch must be >= 2 (torch specialises a 1).

  seq_dims: forward argument name -> its sequence dimension (dynamic too, up to `max_seq`;
  served at the sequence buckets, one artifact per bucket).
  """
  import inspect

  import torch

  args = tuple(example_inputs)
  for i, a in enumerate(args):
    if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] < 2:
      raise ValueError(f"example input {i} must be a tensor with a batch (first) dimension >= 2;"
                       " torch.export specialises a batch of 1 to a constant")
  names = list(inspect.signature(module.forward).parameters)[:len(args)]
  unknown = sorted(set(seq_dims or {}) - set(names))
  if unknown:
    raise ValueError(f"seq_dims names {unknown}, not arguments of forward {names}")
  batch = torch.export.Dim("batch", min=1)
  seq = torch.export.Dim("seq", min=2, max=max_seq) if seq_dims else None
  dynamic = tuple({0: batch, **({seq_dims[n]: seq} if n in (seq_dims or {}) else {})}
                  for n in names)
  was_training = module.training
  module.eval()
  try:
    with torch.no_grad():
      ep = torch.export.export(module, args, dynamic_shapes=dynamic)
  finally:
    module.train(was_training)
  return ep


def _numpy(t: Any) -> np.ndarray:
  """A torch tensor as a numpy array (bfloat16 through ml_dtypes)."""
  import ml_dtypes
  import torch

  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.float().numpy().astype(ml_dtypes.bfloat16)
  return t.numpy().copy()


def _input(name: str, val: Any) -> Input:
  """The served `Input` of a user placeholder from the fake tensor torch.export recorded."""
  import torch

  if not isinstance(val, torch.Tensor):
    raise ValueError(f"input {name!r} is not a tensor ({type(val).__name__}): serve tensors only")
  shape = tuple(val.shape)
  if not shape or not isinstance(shape[0], torch.SymInt):
    raise ValueError(f"input {name!r} has a fixed first dimension {shape[:1]}: capture with a"
                     " dynamic batch (torch.export dynamic_shapes={0: Dim('batch')})")
  # Any other dynamic dimension is the sequence: served at the sequence buckets.
  rest = [d if isinstance(d, int) else "seq" for d in shape[1:]]
  return Input(name, str(val.dtype).removeprefix("torch."), ("batch", *rest))


def _lifted(ep: Any, spec: Any) -> np.ndarray:
  """The value of a lifted parameter, buffer or constant tensor."""
  if spec.target in ep.state_dict:
    return _numpy(ep.state_dict[spec.target])
  if spec.target in ep.constants and hasattr(ep.constants[spec.target], "detach"):
    return _numpy(ep.constants[spec.target])
  raise UnsupportedOperatorError(f"input {spec.arg.name!r} ({spec.kind.name}, {spec.target!r}):"
                                 " only tensor params, buffers and constants lower")


def unsupported_ops(graph: Any, table: Mapping[str, Any]) -> dict[str, str]:
  """Op name -> where it is first called (a line of the model's source), for ops not in `table`."""
  missing: dict[str, str] = {}
  for node in graph.nodes:
    if node.op in ("placeholder", "output"):
      continue
    name = op_name(node.target) if node.op == "call_function" else f"{node.op}:{node.target}"
    if name not in table and name not in missing:
      trace = (node.meta.get("stack_trace") or "").strip().splitlines()
      missing[name] = trace[-1].strip() if trace else node.name
  return missing


def program(ep: Any) -> Program:
  """The `Program` of an ExportedProgram, decomposed to the core ATen op set."""
  import torch
  from torch.export.graph_signature import InputKind, OutputKind

  ep = ep.run_decompositions()
  sig = ep.graph_signature
  bad_outputs = [o.arg.name for o in sig.output_specs if o.kind != OutputKind.USER_OUTPUT]
  if bad_outputs:
    raise ValueError(f"the program mutates state ({bad_outputs}): export the model in eval mode")
  gm = copy.deepcopy(ep.graph_module)
  # Placeholders follow the signature's input specs in order (a copied graph may rename them).
  nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
  params, placeholders, inputs = {}, {}, []
  for node, spec in zip(nodes, sig.input_specs, strict=True):
    name = spec.arg.name
    if spec.kind == InputKind.USER_INPUT:
      inputs.append(_input(name, node.meta.get("val")))
      placeholders[node.name] = ("input", name)
    elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
      params[spec.target] = _lifted(ep, spec)
      placeholders[node.name] = ("param", spec.target)
    else:
      raise UnsupportedOperatorError(f"input {name!r} of kind {spec.kind.name} does not lower")
  rewrites = bags.rewrite_padded_bags(gm.graph)
  missing = unsupported_ops(gm.graph, aten_ops())
  if missing:
    raise UnsupportedOperatorError(
        "no lowering for operator(s): " + "; ".join(f"{k} (at {v})" for k, v in missing.items())
        + ". Rewrite that part of the model with supported ops, or add a lowering to"
        " export/torch/ops.py")
  return Program(gm.graph, params, placeholders, tuple(inputs), rewrites, torch.__version__)
