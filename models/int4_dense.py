"""A dense layer with packed int4 weights (per-group scales and zero points), run by `int4_matmul`.

`export.awq` builds these from float `models.layers.Dense` layers (after folding AWQ's activation
scales into the weights) and swaps them into the model; the exported StableHLO then holds the
int4 kernel (CUDA) or its jnp reference (CPU) and uint8 params, and the model code is not needed
to serve it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import kernel_impl
from pallas_kernels.int4_matmul import int4_matmul
from pallas_kernels.quantize_int4 import dequantize_int4, quantize_int4_packed, unpack_int4


class Int4Dense(nnx.Module):
  """y = x @ dequant(kernel_packed, kernel_scales, kernel_zeros) + bias.

  Params: `kernel_packed` uint8 [Kp/2, out] (two codes a byte, the layout of
  `pallas_kernels.quantize_int4`), `kernel_scales` float32 and `kernel_zeros` uint8 [Kp/G, out],
  optional float32 `bias` [out]; Kp is in_features rounded up to a multiple of group_size.
  """

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, *, group_size: int,
               axes: tuple[str, str], impl: str = "auto"):
    packed, scales, zeros = quantize_int4_packed(kernel, group_size)
    self.in_features = int(kernel.shape[0])
    self.group_size = group_size
    self.impl = impl
    self.kernel_packed = nnx.Param(packed, logical_axes=axes)
    self.kernel_scales = nnx.Param(scales, logical_axes=(None, axes[1]))
    self.kernel_zeros = nnx.Param(zeros, logical_axes=(None, axes[1]))
    self.bias = None if bias is None else nnx.Param(
        jnp.asarray(bias, jnp.float32), logical_axes=(axes[1],))

  @classmethod
  def from_dense(cls, dense: nnx.Module, *, group_size: int, impl: str = "auto") -> Int4Dense:
    """Quantizes a float `models.layers.Dense` (its kernel [in, out] and bias, axes kept)."""
    if dense.quantization != "none":
      raise ValueError(f"the layer is already quantized ({dense.quantization})")
    bias = None if dense.bias is None else dense.bias[...]
    return cls(dense.kernel[...], bias, group_size=group_size, axes=dense.axes, impl=impl)

  def dequantized_kernel(self) -> jax.Array:
    """The float32 kernel [in, out] these params stand for."""
    codes = unpack_int4(self.kernel_packed[...], self.group_size)
    w = dequantize_int4(codes, self.kernel_scales[...], self.kernel_zeros[...], self.group_size)
    return w[:self.in_features]

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., in] -> [..., out]
    lead = x.shape[:-1]
    y = int4_matmul(
        x.reshape(-1, x.shape[-1]),  # [M, in]
        self.kernel_packed[...],  # [Kp/2, out] uint8
        self.kernel_scales[...],  # [Kp/G, out]
        self.kernel_zeros[...],  # [Kp/G, out] uint8
        group_size=self.group_size, impl=kernel_impl(self.impl, x))  # -> [M, out]
    y = y.reshape(*lead, -1)
    if self.bias is not None:
      y = y + self.bias[...]
    return y
