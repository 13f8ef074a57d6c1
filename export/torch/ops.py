"""The ATen op table: core ATen operator name -> a `jnp` function with ATen's argument order.

`torch.export` decomposed to the core ATen set (`ExportedProgram.run_decompositions()`) calls
only these names; `export.torch.lower` interprets the graph node by node through this table.
An op missing here fails the export naming it (`UnsupportedOperatorError`), never the server.
Keys are `str(OpOverload)` ("aten.addmm.default") or "operator.<name>" for Python's operators
on symbolic sizes; torch dtypes arrive already converted to numpy dtypes (lower.py).
"""

from __future__ import annotations

import operator
import types
from typing import Any, Callable, Mapping, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from export.torch import bags



def _int() -> Any:
  """ATen's int64 default as jax has it (int32 unless x64 is on)."""
  return jax.dtypes.canonicalize_dtype(np.int64)


class UnsupportedOperatorError(NotImplementedError):
  """The captured program calls operators the translator has no lowering for (all named)."""


def _dims(x: jax.Array, dim: int | Sequence[int] | None) -> tuple[int, ...] | None:
  """ATen's `dim` argument (an int, a list, or None/[] for every dimension) as a tuple."""
  if dim is None or (not isinstance(dim, int) and len(dim) == 0):
    return None
  return (dim,) if isinstance(dim, int) else tuple(dim)


def _reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
  def op(x, dim=None, keepdim=False, *, dtype=None):
    out = fn(x, axis=_dims(x, dim), keepdims=keepdim)
    return out if dtype is None else out.astype(dtype)
  return op


def _slice(x, dim=0, start=None, end=None, step=1):
  """x[..., start:end:step] along `dim`; ATen's INT64_MAX end means "to the end"."""
  if start in (None, 0) and (end is None or (isinstance(end, int) and end >= 2**62)) and step == 1:
    return x
  n = x.shape[dim]
  if isinstance(end, int) and end >= 2**62:
    end = None
  elif isinstance(end, int) and isinstance(n, int):
    end = min(end, n)
  index = [slice(None)] * x.ndim
  index[dim] = slice(start, end, step)
  return x[tuple(index)]


def _select(x, dim, index):
  idx = [slice(None)] * x.ndim
  idx[dim] = index
  return x[tuple(idx)]


def _index(x, indices):
  return x[tuple(slice(None) if i is None else i for i in indices)]


def _expand(x, size, implicit=False):
  """broadcast_to with ATen's -1 ("keep this dimension")."""
  lead = len(size) - x.ndim
  shape = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
  return jnp.broadcast_to(x, tuple(shape))


def _squeeze(x, dims=None):
  dims = range(x.ndim) if dims is None else ([dims] if isinstance(dims, int) else dims)
  dims = [d % x.ndim for d in dims if isinstance(x.shape[d], int) and x.shape[d] == 1]
  return jnp.squeeze(x, tuple(dims)) if dims else x


def _arange(start, end=None, step=1, *, dtype=None):
  if end is None:
    start, end = 0, start
  if dtype is None:
    dtype = _int() if all(isinstance(v, int) or not isinstance(v, float)
                        for v in (start, end, step)) else np.float32
  if all(isinstance(v, (int, float)) for v in (start, end, step)):
    return jnp.arange(start, end, step, dtype=dtype)
  count = (end - start + step - 1) // step  # symbolic: a dimension expression
  return (lax.iota(jnp.int32, count) * step + start).astype(dtype)


def _full(size, value, *, dtype=None):
  if dtype is None:
    dtype = (np.bool_ if isinstance(value, bool) else _int() if isinstance(value, int)
             else np.float32)
  return jnp.full(tuple(size), value, dtype=dtype)


def _full_like(x, value, *, dtype=None):
  return jnp.full(x.shape, value, dtype=dtype or x.dtype)


def _layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
  axes = tuple(range(x.ndim - len(shape), x.ndim))
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
  rstd = lax.rsqrt(var + eps)
  out = (xf - mean) * rstd
  if weight is not None:
    out = out * weight
  if bias is not None:
    out = out + bias
  return out.astype(x.dtype), mean, rstd


def _batch_norm_eval(x, weight, bias, mean, var, momentum, eps):
  """`_native_batch_norm_legit_no_training`: running statistics, channels on dimension 1."""
  shape = (1, -1) + (1,) * (x.ndim - 2)
  out = (x - mean.reshape(shape)) * lax.rsqrt(var.reshape(shape) + eps)
  if weight is not None:
    out = out * weight.reshape(shape)
  if bias is not None:
    out = out + bias.reshape(shape)
  return out, jnp.zeros((0,), x.dtype), jnp.zeros((0,), x.dtype)


def _safe_softmax(x, dim, dtype=None):
  out = jax.nn.softmax(x, axis=dim)
  out = jnp.where(jnp.all(x == -jnp.inf, axis=dim, keepdims=True), 0.0, out)
  return out if dtype is None else out.astype(dtype)


def _div(a, b, rounding_mode=None):
  if rounding_mode is None:
    return jnp.true_divide(a, b)
  if rounding_mode == "floor":
    return jnp.floor_divide(a, b)
  q = jnp.true_divide(a, b)  # "trunc"
  both_int = all(jnp.issubdtype(jnp.result_type(v), jnp.integer) for v in (a, b))
  return jnp.trunc(q).astype(jnp.result_type(a, b)) if both_int else jnp.trunc(q)


def _clamp(x, min=None, max=None):  # noqa: A002 - ATen's names
  return jnp.clip(x, min, max)


def _max_dim(x, dim, keepdim=False):
  return jnp.max(x, axis=dim, keepdims=keepdim), jnp.argmax(x, axis=dim, keepdims=keepdim)


def _min_dim(x, dim, keepdim=False):
  return jnp.min(x, axis=dim, keepdims=keepdim), jnp.argmin(x, axis=dim, keepdims=keepdim)


def _argmax(x, dim=None, keepdim=False):
  return jnp.argmax(x, axis=dim, keepdims=keepdim if dim is not None else False)


def _topk(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
  moved = jnp.moveaxis(x, dim, -1)
  vals, idx = lax.top_k(moved if largest else -moved, k)
  vals = vals if largest else -vals
  return jnp.moveaxis(vals, -1, dim), jnp.moveaxis(idx, -1, dim)


def _pad(x, pad, value=0.0):
  """`constant_pad_nd`: pairs from the last dimension backwards; negative pads crop."""
  config = [(0, 0, 0)] * x.ndim
  for i in range(len(pad) // 2):
    config[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1], 0)
  return lax.pad(x, jnp.asarray(value, x.dtype), config)


def _split_with_sizes(x, sizes, dim=0):
  points = np.cumsum(sizes)[:-1].tolist()
  return jnp.split(x, points, axis=dim)


def _split(x, size, dim=0):
  n = x.shape[dim]
  return _split_with_sizes(x, [min(size, n - i) for i in range(0, n, size)], dim)


def _repeat(x, repeats):
  return jnp.tile(x.reshape((1,) * (len(repeats) - x.ndim) + x.shape), tuple(repeats))


def _gelu(x, approximate="none"):
  return jax.nn.gelu(x, approximate=approximate == "tanh")


def _cumsum(x, dim, dtype=None):
  return jnp.cumsum(x, axis=dim, dtype=dtype)


def _var(x, dim=None, *, correction=1, keepdim=False):
  return jnp.var(x, axis=_dims(x, dim), ddof=correction, keepdims=keepdim)


def _copy(dst, src, non_blocking=False):
  return jnp.broadcast_to(src, dst.shape).astype(dst.dtype)


def _sort(x, dim=-1, descending=False, stable=False):
  idx = jnp.argsort(x, axis=dim, stable=True, descending=descending)
  return jnp.take_along_axis(x, idx, axis=dim), idx


def _softplus(x, beta=1.0, threshold=20.0):
  return jnp.where(x * beta > threshold, x, jnp.log1p(jnp.exp(x * beta)) / beta)


def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
  return scale * jnp.where(x > 0, x, alpha * jnp.expm1(x * input_scale))


def _unbind(x, dim=0):
  return [_select(x, dim, i) for i in range(x.shape[dim])]


def _nothing(*args, **kwargs):
  """Run-time checks and no-ops of the captured graph (shapes are checked by jax.export)."""
  return None


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
  """`add`/`sub` with ATen's `alpha` (other scaled before the op)."""
  def op(a, b, alpha=1):
    return fn(a, b if alpha == 1 else b * alpha)
  return op


_IDENTITY = lambda x, *a, **k: x  # noqa: E731
_ELEMENTWISE = {
    "abs": jnp.abs, "neg": jnp.negative, "exp": jnp.exp, "log": jnp.log, "log1p": jnp.log1p,
    "expm1": jnp.expm1, "sqrt": jnp.sqrt, "rsqrt": lax.rsqrt, "reciprocal": jnp.reciprocal,
    "sin": jnp.sin, "cos": jnp.cos, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu, "erf": jax.scipy.special.erf, "floor": jnp.floor, "ceil": jnp.ceil,
    "round": jnp.round, "trunc": jnp.trunc, "sign": jnp.sign, "logical_not": jnp.logical_not,
    "bitwise_not": jnp.invert, "isnan": jnp.isnan, "isinf": jnp.isinf, "silu": jax.nn.silu,
    "hardsigmoid": jax.nn.hard_sigmoid, "hardswish": jax.nn.hard_swish,
}
_BINARY = {
    "mul": jnp.multiply, "div": jnp.true_divide, "pow": jnp.power, "maximum": jnp.maximum,
    "minimum": jnp.minimum, "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less,
    "le": jnp.less_equal, "gt": jnp.greater, "ge": jnp.greater_equal,
    "logical_and": jnp.logical_and, "logical_or": jnp.logical_or, "logical_xor": jnp.logical_xor,
    "bitwise_and": jnp.bitwise_and, "bitwise_or": jnp.bitwise_or, "remainder": jnp.remainder,
    "fmod": jnp.fmod, "atan2": jnp.arctan2,
}
_OVERLOADS = ("Tensor", "Scalar", "Tensor_Tensor", "Tensor_Scalar", "default")


def _elementwise_ops() -> dict[str, Callable[..., Any]]:
  """Element-wise math, every overload (Tensor, Scalar, ...) of each."""
  t: dict[str, Callable[..., Any]] = {}
  for name, fn in _ELEMENTWISE.items():
    t[f"aten.{name}.default"] = fn
  for name, fn in _BINARY.items():
    for ov in _OVERLOADS:
      t[f"aten.{name}.{ov}"] = fn
  t["aten.pow.Scalar"] = jnp.power
  for name, fn in (("add", jnp.add), ("sub", jnp.subtract)):
    for ov in ("Tensor", "Scalar"):
      t[f"aten.{name}.{ov}"] = _binary(fn)
  t["aten.rsub.Scalar"] = t["aten.rsub.Tensor"] = lambda a, b, alpha=1: b - a * alpha
  t["aten.div.Tensor_mode"] = t["aten.div.Scalar_mode"] = _div
  return t


def _layout_ops() -> dict[str, Callable[..., Any]]:
  """Shapes, indexing, copies, checks and tensor creation."""
  return {
      # shapes and layout
      "aten.view.default": lambda x, s: jnp.reshape(x, tuple(s)),
      "aten._unsafe_view.default": lambda x, s: jnp.reshape(x, tuple(s)),
      "aten.reshape.default": lambda x, s: jnp.reshape(x, tuple(s)),
      "aten.permute.default": lambda x, d: jnp.transpose(x, tuple(d)),
      "aten.expand.default": _expand,
      "aten.unsqueeze.default": jnp.expand_dims,
      "aten.squeeze.dims": _squeeze, "aten.squeeze.dim": _squeeze, "aten.squeeze.default": _squeeze,
      "aten.slice.Tensor": _slice, "aten.select.int": _select, "aten.index.Tensor": _index,
      "aten.cat.default": lambda xs, dim=0: jnp.concatenate(list(xs), axis=dim),
      "aten.split_with_sizes.default": _split_with_sizes, "aten.split.Tensor": _split,
      "aten.constant_pad_nd.default": _pad, "aten.repeat.default": _repeat,
      "aten.gather.default": lambda x, dim, idx, sparse_grad=False: jnp.take_along_axis(
          x, idx, axis=dim),
      "aten.index_select.default": lambda x, dim, idx: jnp.take(x, idx, axis=dim),
      "aten.flip.default": lambda x, dims: jnp.flip(x, tuple(dims)),
      "aten.unbind.int": _unbind,
      "aten.masked_fill.Scalar": lambda x, mask, v: jnp.where(mask, jnp.asarray(v, x.dtype), x),
      "aten.masked_fill.Tensor": lambda x, mask, v: jnp.where(mask, v.astype(x.dtype), x),
      # copies, casts and checks
      "aten.clone.default": _IDENTITY, "aten.alias.default": _IDENTITY,
      "aten.lift_fresh_copy.default": _IDENTITY, "aten.detach.default": _IDENTITY,
      "aten._to_copy.default": lambda x, *, dtype=None: x if dtype is None else x.astype(dtype),
      "aten.copy.default": _copy,
      "aten._assert_tensor_metadata.default": _nothing, "aten._assert_scalar.default": _nothing,
      "aten.sym_constrain_range_for_size.default": _nothing,
      "aten.sym_size.int": lambda x, d: x.shape[d],
      # creation
      "aten.full.default": _full, "aten.full_like.default": _full_like,
      "aten.zeros_like.default": lambda x, *, dtype=None: jnp.zeros(x.shape, dtype or x.dtype),
      "aten.scalar_tensor.default": lambda v, *, dtype=None: jnp.asarray(v, dtype or np.float32),
      "aten.arange.start_step": _arange, "aten.arange.default": _arange,
      "aten.arange.start": _arange,
  }


def _math_ops() -> dict[str, Callable[..., Any]]:
  """Linear algebra, reductions, activations, normalisation, Python's operators on sizes."""
  return {
      # linear algebra
      "aten.mm.default": jnp.matmul, "aten.bmm.default": jnp.matmul,
      "aten.addmm.default": lambda c, a, b, *, beta=1, alpha=1: beta * c + alpha * (a @ b),
      "aten.baddbmm.default": lambda c, a, b, *, beta=1, alpha=1: beta * c + alpha * (a @ b),
      # reductions
      "aten.sum.dim_IntList": _reduce(jnp.sum), "aten.mean.dim": _reduce(jnp.mean),
      "aten.sum.default": lambda x, *, dtype=None: jnp.sum(x, dtype=dtype),
      "aten.mean.default": lambda x, *, dtype=None: jnp.mean(x, dtype=dtype),
      "aten.amax.default": _reduce(jnp.max), "aten.amin.default": _reduce(jnp.min),
      "aten.any.dim": _reduce(jnp.any), "aten.any.dims": _reduce(jnp.any),
      "aten.any.default": jnp.any, "aten.all.dim": _reduce(jnp.all),
      "aten.prod.dim_int": _reduce(jnp.prod),
      "aten.max.dim": _max_dim, "aten.min.dim": _min_dim, "aten.argmax.default": _argmax,
      "aten.var.correction": _var, "aten.cumsum.default": _cumsum, "aten.topk.default": _topk,
      "aten.sort.default": _sort, "aten.sort.stable": _sort,
      "aten.max.default": jnp.max, "aten.min.default": jnp.min,
      # activations and normalisation
      "aten.clamp.default": _clamp, "aten.clamp.Tensor": _clamp,
      "aten.clamp_min.default": lambda x, m: jnp.maximum(x, m),
      "aten.clamp_max.default": lambda x, m: jnp.minimum(x, m),
      "aten.where.self": jnp.where, "aten.gelu.default": _gelu,
      "aten.softplus.default": _softplus, "aten.elu.default": _elu,
      "aten.hardtanh.default": lambda x, lo=-1.0, hi=1.0: jnp.clip(x, lo, hi),
      "aten.leaky_relu.default": lambda x, slope=0.01: jax.nn.leaky_relu(x, slope),
      "aten._softmax.default": lambda x, dim, half_to_float=False: jax.nn.softmax(x, axis=dim),
      "aten._log_softmax.default": lambda x, dim, half_to_float=False: jax.nn.log_softmax(
          x, axis=dim),
      "aten._safe_softmax.default": _safe_softmax,
      "aten.native_layer_norm.default": _layer_norm,
      "aten._native_batch_norm_legit_no_training.default": _batch_norm_eval,
      # Python's operators on symbolic sizes (the batch dimension)
      "operator.getitem": operator.getitem, "operator.mul": operator.mul,
      "operator.add": operator.add, "operator.sub": operator.sub,
      "operator.floordiv": operator.floordiv, "operator.mod": operator.mod,
      "operator.neg": operator.neg,
  }


def _table() -> dict[str, Callable[..., Any]]:
  """Every op name the translator lowers (built on call: nothing is built at import)."""
  return {**_elementwise_ops(), **_layout_ops(), **_math_ops(), **bags.BAG_OPS}


def op_name(target: Any) -> str:
  """The op-table key of an FX call target: "aten.addmm.default", "operator.mul", ..."""
  if target in bags.CUSTOM_TARGETS:
    return bags.CUSTOM_TARGETS[target]
  module = getattr(target, "__module__", "") or ""
  if module in ("_operator", "operator"):
    return f"operator.{target.__name__}"
  text = str(target)
  return text if text.startswith(("aten.", "prims.")) else f"{module}.{getattr(target, '__name__', text)}"


def aten_ops() -> Mapping[str, Callable[..., Any]]:
  """The op table, read-only."""
  return types.MappingProxyType(_table())
