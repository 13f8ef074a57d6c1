"""Quantization helpers for the quantized kernels: per-channel int8/fp8 weights, per-row tables, activations.

Plain `jnp`, usable at load/export time and inside kernels (`int8_symmetric_codes` is shared by the
W8A8 kernel and its reference so both round the same way).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT8_MAX = 127
FP8_E4M3_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448.0
ROW_DTYPES = (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8))


def _channel_amax(w: jax.Array, axis: int) -> tuple[jax.Array, int]:
  """max|w| over every axis but `axis` (the channel axis), as float32 of shape [w.shape[axis]]."""
  if w.ndim < 1:
    raise ValueError(f"{w.shape=} must have at least one axis")
  axis = axis % w.ndim
  others = tuple(a for a in range(w.ndim) if a != axis)
  amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=others) if others else jnp.abs(
      w.astype(jnp.float32))
  return amax, axis


def _expand(scale: jax.Array, ndim: int, axis: int) -> jax.Array:
  shape = [1] * ndim
  shape[axis] = scale.shape[0]
  return scale.reshape(shape)


def quantize_int8_per_channel(w: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8, one float32 scale per index of `axis` (the output channel: -1 for w [K, N]).

  Returns (w_q int8, scale [w.shape[axis]]) with w ~= w_q * scale; an all-zero channel gets scale 1.
  """
  amax, axis = _channel_amax(w, axis)
  scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
  w_q = jnp.clip(jnp.round(w.astype(jnp.float32) / _expand(scale, w.ndim, axis)), -INT8_MAX,
                 INT8_MAX)
  return w_q.astype(jnp.int8), scale


def dequantize_int8_per_channel(w_q: jax.Array, scale: jax.Array, axis: int = -1) -> jax.Array:
  """Inverse of `quantize_int8_per_channel`: w_q * scale as float32."""
  axis = axis % w_q.ndim
  return w_q.astype(jnp.float32) * _expand(scale.astype(jnp.float32), w_q.ndim, axis)


def quantize_fp8_per_channel(w: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
  """float8_e4m3fn with one float32 scale per index of `axis`, the channel max mapped to 448.

  Returns (w_q float8_e4m3fn, scale [w.shape[axis]]); values are clipped first (e4m3fn has no inf).
  """
  amax, axis = _channel_amax(w, axis)
  scale = jnp.where(amax > 0, amax / FP8_E4M3_MAX, 1.0).astype(jnp.float32)
  w_s = jnp.clip(w.astype(jnp.float32) / _expand(scale, w.ndim, axis), -FP8_E4M3_MAX,
                 FP8_E4M3_MAX)
  return w_s.astype(jnp.float8_e4m3fn), scale


def dequantize_fp8_per_channel(w_q: jax.Array, scale: jax.Array, axis: int = -1) -> jax.Array:
  """Inverse of `quantize_fp8_per_channel`: w_q * scale as float32."""
  return dequantize_int8_per_channel(w_q, scale, axis)


def int8_symmetric_codes(x: jax.Array, amax: jax.Array) -> jax.Array:
  """Float int8 codes of x for a symmetric scale amax/127: clip(floor(x * 127/amax + 0.5)).

  Round-half-up via floor because the Triton back end has no `round`; the W8A8 kernel and
  `quantize_activations_int8` both call this, so kernel and reference agree code for code.
  """
  inv = jnp.where(amax > 0, INT8_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
  return jnp.clip(jnp.floor(x * inv + 0.5), -INT8_MAX, INT8_MAX)


def quantize_activations_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row symmetric int8 for activations x [M, K]: (x_q int8 [M, K], scale [M] = max|x|/127)."""
  if x.ndim != 2:
    raise ValueError(f"{x.shape=} must be [M, K]")
  xf = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xf), axis=1)
  x_q = int8_symmetric_codes(xf, amax[:, None]).astype(jnp.int8)
  return x_q, amax / INT8_MAX


def quantize_rows_int8(
    table: jax.Array, dtype: jnp.dtype = jnp.uint8
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Asymmetric row-wise quantization of an embedding table [rows, dim] to uint8 or int8.

  Returns (q [rows, dim], scale [rows], offset [rows]) with table ~= q * scale + offset, the row's
  min and max landing exactly on the lowest and highest code. A constant row is exact.
  """
  dtype = jnp.dtype(dtype)
  if dtype not in ROW_DTYPES:
    raise ValueError(f"{dtype=} must be one of {ROW_DTYPES}")
  if table.ndim != 2:
    raise ValueError(f"{table.shape=} must be [rows, dim]")
  t = table.astype(jnp.float32)
  lo = jnp.min(t, axis=1)
  hi = jnp.max(t, axis=1)
  scale = jnp.where(hi > lo, (hi - lo) / 255.0, 1.0).astype(jnp.float32)
  codes = jnp.clip(jnp.round((t - lo[:, None]) / scale[:, None]), 0, 255)  # [rows, dim] in 0..255
  code_min = float(jnp.iinfo(dtype).min)  # 0 for uint8, -128 for int8
  q = (codes + code_min).astype(dtype)
  offset = (lo - code_min * scale).astype(jnp.float32)
  return q, scale, offset


def dequantize_rows(q: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
  """Inverse of `quantize_rows_int8`: q * scale[:, None] + offset[:, None] as float32."""
  return q.astype(jnp.float32) * scale[:, None] + offset[:, None]
