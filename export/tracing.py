"""What every export traces with: flat params and their specs, named outputs, platform checks.

A model (NNX module or params pytree) becomes flat leaves, one `ParamSpec` per leaf and a
`rebuild(leaves)` that the exported function calls, so the artifact takes params as a list.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bundle import ParamSpec, TensorSpec

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def dtype_name(dtype: Any) -> str:
  """The manifest's name of `dtype`: numpy's, or "bfloat16"."""
  return "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else str(np.dtype(dtype))


def disabled_checks(platform: str) -> list[jax.export.DisabledSafetyCheck]:
  """GPU artifacts may call Pallas/Triton kernels, a custom call jax.export refuses by default."""
  return ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
          if platform in ("cuda", "rocm") else [])


def is_nnx_module(obj: Any) -> bool:
  """True for a `flax.nnx.Module` (False where flax.nnx is not installed)."""
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Module)


def nnx_parts(module: Any) -> tuple[list[Any], list[ParamSpec], Callable[[list[Any]], Any]]:
  """Flattens an NNX module to leaves + specs, and returns a rebuild(leaves) -> module.

  The rebuilt module is in eval mode (`nnx.Module.eval()`: dropout off, batch norm on its
  running statistics): serving is deterministic. RNG state (e.g. the `nnx.Rngs` a Dropout
  layer keeps) is not a parameter; it stays a constant of the export.
  """
  from flax import nnx

  graphdef, rng_state, state = nnx.split(module, nnx.RngState, ...)
  variables, treedef = jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
  leaves, specs = [], []
  for path, var in zip(paths, variables):
    value = var[...] if isinstance(var, nnx.Variable) else var
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    leaves.append(value)
    specs.append(ParamSpec(jax.tree_util.keystr(path, simple=True, separator="/"),
                           tuple(value.shape), dtype_name(value.dtype),
                           None if axes is None else tuple(axes)))

  def rebuild(new_leaves: list[Any]) -> Any:
    new_vars = [v.replace(x) if isinstance(v, nnx.Variable) else x
                for v, x in zip(variables, new_leaves)]
    rebuilt = nnx.merge(graphdef, rng_state, jax.tree.unflatten(treedef, new_vars))
    rebuilt.eval()
    return rebuilt

  return leaves, specs, rebuild


def tree_parts(params: Any, logical_axes: Any = None
               ) -> tuple[list[Any], list[ParamSpec], Callable[[list[Any]], Any]]:
  """Flattens a params pytree to leaves + specs, with optional matching logical axes tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  axes_leaves = ([None] * len(flat) if logical_axes is None else
                 jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple) or x is None))
  if len(axes_leaves) != len(flat):
    raise ValueError(f"logical_axes has {len(axes_leaves)} leaves, params {len(flat)}")
  leaves = [jnp.asarray(x) for _, x in flat]
  specs = [ParamSpec(jax.tree_util.keystr(p, simple=True, separator="/"), tuple(x.shape),
                     dtype_name(x.dtype), None if a is None else tuple(a))
           for (p, _), x, a in zip(flat, leaves, axes_leaves)]
  return leaves, specs, lambda new: jax.tree.unflatten(treedef, new)


def as_output_dict(out: Any, output_names: Sequence[str] | None) -> dict[str, jax.Array]:
  """Outputs as a dict: a dict as is, else arrays named by `output_names` or by position."""
  if isinstance(out, Mapping):
    return dict(out)
  outs = list(out) if isinstance(out, (tuple, list)) else [out]
  names = list(output_names) if output_names else (
      ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
  if len(names) != len(outs):
    raise ValueError(f"{len(outs)} outputs but output_names={names}")
  return dict(zip(names, outs))


def output_specs(serve_fn: Callable[..., Any], param_structs: list[Any],
                 in_structs: Callable[[int | None], dict[str, Any]], b: Any,
                 seq_buckets: Sequence[int]) -> tuple[TensorSpec, ...]:
  """Output specs from abstract evaluation; with sequences, at two lengths to find "seq" dims."""
  if not seq_buckets:
    outs = [jax.eval_shape(serve_fn, param_structs, in_structs(None))]
    seqs: list[int] = []
  else:
    seqs = [seq_buckets[0], seq_buckets[1] if len(seq_buckets) > 1 else
            (seq_buckets[0] - 1 if seq_buckets[0] > 1 else 2)]
    outs = [jax.eval_shape(serve_fn, param_structs, in_structs(s)) for s in seqs]
  specs = []
  for k, v in outs[0].items():
    dims = []
    for i, n in enumerate(v.shape):
      others = [o[k].shape[i] for o in outs]
      if not isinstance(n, int):
        if n != b:
          raise ValueError(f"output {k!r} dimension {i} ({n}) is not the batch dimension")
        dims.append("batch")
      elif seqs and others == seqs:
        dims.append("seq")
      elif len(set(others)) == 1:
        dims.append(None)
      else:
        raise ValueError(f"output {k!r} dimension {i} is {others} at sequence lengths {seqs}:"
                         " an output dimension must be fixed, the batch or the sequence")
    specs.append(TensorSpec(k, dtype_name(v.dtype),
                            tuple(-1 if d else n for d, n in zip(dims, v.shape)), tuple(dims)))
  return tuple(specs)
