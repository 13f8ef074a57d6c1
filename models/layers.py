"""Building blocks shared by the models: dense layers and MLPs with logical axis names.

Parameters carry `logical_axes` metadata; `sharding/` maps those names to mesh axes.
A `Dense` is float or quantized (int8/fp8 kernel + per-output-channel scales, run by
`pallas_kernels.quantized_matmul`); `export.quantize` switches a model's layers at export.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import quantized_matmul
from pallas_kernels.quantize import (
    dequantize_fp8_per_channel,
    dequantize_int8_per_channel,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
)

# Kernel states of a Dense: float, or a `quantized_matmul` mode.
DENSE_QUANTIZATIONS: tuple[str, ...] = ("none", "w8a16", "w8a8", "fp8")


def is_symbolic(*arrays: jax.Array) -> bool:
  """True if any dimension is symbolic (jax.export shape polymorphism, as `export_model` traces)."""
  return any(not isinstance(d, int) for a in arrays for d in a.shape)


def kernel_impl(impl: str, *arrays: jax.Array) -> str:
  """The kernel `impl` to use for these operands: "auto" becomes "xla" when a shape is symbolic.

  `export_model` traces with a symbolic batch, and `impl="auto"` traces the Pallas branch too
  (`lax.platform_dependent` stages every branch), which fails: Triton grids need static bounds
  ("dynamic grid bounds not supported"). The reference is what "auto" lowers to off CUDA anyway,
  so CPU bundles are unchanged; a CUDA bundle with the kernel needs a static-batch export.
  """
  return "xla" if impl == "auto" and is_symbolic(*arrays) else impl


class Dense(nnx.Module):
  """y = x @ kernel + bias, with the kernel's axes named for sharding rules.

  Float: param `kernel` [in, out]. Quantized (`quantize(mode)`): `kernel_q` [in, out] (int8, or
  float8_e4m3fn for "fp8") with the kernel's axes, and `kernel_scale` [out] float32 with axes
  (out_axis,); the matmul runs through `quantized_matmul(..., impl=self.impl)`.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rngs: nnx.Rngs,
      axes: tuple[str, str] = ("embed", "mlp"),
      use_bias: bool = True,
      dtype: jnp.dtype = jnp.float32,
  ):
    scale = (2.0 / (in_features + out_features)) ** 0.5
    self.kernel = nnx.Param(
        scale * jax.random.normal(rngs.params(), (in_features, out_features), dtype),
        logical_axes=axes,
    )
    self.bias = (
        nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],))
        if use_bias
        else None
    )
    self.quantization = "none"  # one of DENSE_QUANTIZATIONS (static: part of the graph)
    self.impl = "auto"  # kernel dispatch for quantized matmuls (pallas_kernels.IMPLS)

  @property
  def axes(self) -> tuple[str, str]:
    """The kernel's logical axes (in, out)."""
    var = self.kernel if self.quantization == "none" else self.kernel_q
    return tuple(var.get_metadata()["logical_axes"])

  def quantize(self, mode: str, *, impl: str = "auto") -> None:
    """Switches this layer in place to a quantized kernel (`mode` is a quantized_matmul mode)."""
    if mode not in DENSE_QUANTIZATIONS[1:]:
      raise ValueError(f"mode={mode!r} must be one of {DENSE_QUANTIZATIONS[1:]}")
    if self.quantization != "none":
      raise ValueError(f"layer is already quantized ({self.quantization}); dequantize() first")
    axes = self.axes
    w = self.kernel[...]
    w_q, scale = (quantize_fp8_per_channel(w, axis=-1) if mode == "fp8" else
                  quantize_int8_per_channel(w, axis=-1))
    del self.kernel
    self.kernel_q = nnx.Param(w_q, logical_axes=axes)
    self.kernel_scale = nnx.Param(scale, logical_axes=(axes[1],))
    self.quantization = mode
    self.impl = impl

  def dequantize(self) -> None:
    """Switches a quantized layer back to a float32 kernel w_q * scale, in place."""
    if self.quantization == "none":
      return
    axes = self.axes
    fn = dequantize_fp8_per_channel if self.quantization == "fp8" else dequantize_int8_per_channel
    w = fn(self.kernel_q[...], self.kernel_scale[...], axis=-1)
    del self.kernel_q, self.kernel_scale
    self.kernel = nnx.Param(w, logical_axes=axes)
    self.quantization = "none"

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., in] -> [..., out]
    if self.quantization == "none":
      y = jnp.einsum("...i,io->...o", x, self.kernel[...])
    else:
      lead = x.shape[:-1]
      x2 = x.reshape(-1, x.shape[-1])  # [M, in]
      matmul = lambda rows, impl: quantized_matmul(
          rows,  # [M, in]
          self.kernel_q[...],  # [in, out] int8 / float8_e4m3fn
          self.kernel_scale[...],  # [out]
          mode=self.quantization, impl=impl)  # -> [M, out]
      if is_symbolic(x2):
        # quantized_matmul validates and picks blocks from concrete M: map it over the rows
        # (one row each; per-row activation scales make W8A8 row-independent, so the result is
        # the same) and XLA batches the dots back into one matmul.
        y = jax.vmap(lambda row: matmul(row[None], kernel_impl(self.impl, x2))[0])(x2)
      else:
        y = matmul(x2, self.impl)
      y = y.reshape(*lead, -1)
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class MLP(nnx.Module):
  """Stack of Dense layers, ReLU between them (not after the last).

  Kernels alternate ("embed", "mlp") and ("mlp", "embed") so a tensor-parallel
  plan makes each pair column-then-row parallel (one all-reduce per pair).
  """

  def __init__(
      self,
      in_features: int,
      features: Sequence[int],
      *,
      rngs: nnx.Rngs,
      final_activation: bool = False,
  ):
    self.final_activation = final_activation
    dims = (in_features, *features)
    self.layers = nnx.List([
        Dense(
            dims[i],
            dims[i + 1],
            rngs=rngs,
            axes=("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"),
        )
        for i in range(len(features))
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < n - 1 or self.final_activation:
        x = jax.nn.relu(x)
    return x
