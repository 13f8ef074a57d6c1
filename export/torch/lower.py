"""A captured `Program` as a JAX function: its FX graph interpreted node by node, op by op.

Each `call_function` node runs its op-table function (ops.py) on jax values, so tracing the
result under `jax.export` (with a symbolic batch) yields the program's StableHLO. Params are
arguments (a dict keyed by state name), never closed-over constants.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from export.torch.capture import Program
from export.torch.ops import UnsupportedOperatorError, aten_ops, op_name

# torch dtype (by name) -> the dtype jnp is given; 64-bit types follow jax's x64 setting.
_DTYPES = {
    "torch.float32": np.float32, "torch.float64": np.float64, "torch.float16": np.float16,
    "torch.bfloat16": jnp.bfloat16, "torch.int64": np.int64, "torch.int32": np.int32,
    "torch.int16": np.int16, "torch.int8": np.int8, "torch.uint8": np.uint8,
    "torch.bool": np.bool_,
}
_DROPPED_KWARGS = ("device", "layout", "pin_memory", "memory_format", "non_blocking")


class LoweringError(RuntimeError):
  """An op of the program failed to lower (its name and the model line are in the message)."""


def _resolve(arg: Any, env: Mapping[str, Any]) -> Any:
  """A node argument with graph values looked up and torch dtypes made numpy dtypes."""
  if isinstance(arg, (list, tuple)):
    return type(arg)(_resolve(a, env) for a in arg)
  if hasattr(arg, "op") and hasattr(arg, "name") and hasattr(arg, "users"):  # an fx Node
    return env[arg.name]
  if type(arg).__name__ == "dtype" and str(arg) in _DTYPES:
    return jax.dtypes.canonicalize_dtype(_DTYPES[str(arg)])
  return arg


def _call(node: Any, fn: Callable[..., Any], env: Mapping[str, Any]) -> Any:
  args = _resolve(node.args, env)
  kwargs = {k: _resolve(v, env) for k, v in node.kwargs.items() if k not in _DROPPED_KWARGS}
  try:
    return fn(*args, **kwargs)
  except Exception as e:
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    where = trace[-1].strip() if trace else "?"
    raise LoweringError(f"{op_name(node.target)} (node {node.name}, at {where}): {e}") from e


def interpret(program: Program, params: Mapping[str, Any], inputs: Mapping[str, Any],
              ops: Mapping[str, Callable[..., Any]]) -> list[Any]:
  """Runs the program's graph on jax values; returns its outputs in order."""
  env: dict[str, Any] = {}
  for node in program.graph.nodes:
    if node.op == "placeholder":
      kind, key = program.placeholders[node.name]
      env[node.name] = params[key] if kind == "param" else inputs[key]
    elif node.op == "call_function":
      name = op_name(node.target)
      if name not in ops:
        raise UnsupportedOperatorError(f"no lowering for operator {name}")
      env[node.name] = _call(node, ops[name], env)
    elif node.op == "output":
      outs = node.args[0]
      return [env[o.name] for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
    else:
      raise UnsupportedOperatorError(f"graph node {node.name}: {node.op} {node.target}")
  raise LoweringError("the graph has no output node")


def lowered(program: Program, output_names: Sequence[str] | None = None
            ) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
  """`apply(params, inputs) -> {output name: array}` for `export.export_model` and jax.jit."""
  ops = aten_ops()

  def apply(params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
    outs = interpret(program, params, inputs, ops)
    names = list(output_names) if output_names else (
        ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
    if len(names) != len(outs):
      raise ValueError(f"the program has {len(outs)} outputs but output_names={names}")
    return dict(zip(names, outs))

  return apply
