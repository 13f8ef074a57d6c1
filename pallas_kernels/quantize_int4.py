"""Group-wise asymmetric int4 weight quantization and the packed layout `int4_matmul` reads.

w [K, N] is split along K into groups of `group_size` rows (K zero-padded to a group multiple);
each (group, column) gets a float32 scale and an integer zero point in 0..15, w ~= (q - zero) *
scale with q in 0..15 (AWQ's `zero_point=True` scheme). Two codes share a byte: in group g, byte
row j holds row g*G + j in its low nibble and row g*G + G/2 + j in its high nibble, so a kernel
multiplies the first and second half of a group's activations by the low and high nibbles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT4_MAX = 15  # unsigned codes 0..15
MIN_SCALE = 1e-5  # a constant group gets this scale (AWQ clamps the same way)


def padded_k(k: int, group_size: int) -> int:
  """K rounded up to a multiple of `group_size`: the row count the packed weights cover."""
  return -(-k // group_size) * group_size


def check_group_size(group_size: int) -> None:
  """Group sizes are powers of two >= 32 (a half group is a >= 16-deep Triton dot)."""
  if group_size < 32 or group_size & (group_size - 1):
    raise ValueError(f"{group_size=} must be a power of two >= 32")


def quantize_int4_grouped(
    w: jax.Array, group_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """w [K, N] float -> (codes uint8 [Kp, N] in 0..15, scales f32 [Kp/G, N], zeros uint8 [Kp/G, N]).

  Round to nearest; each group's min and max (with 0 included, so zero is exact) span the codes.
  """
  check_group_size(group_size)
  if w.ndim != 2:
    raise ValueError(f"{w.shape=} must be [K, N]")
  k, n = w.shape
  kp = padded_k(k, group_size)
  wf = jnp.pad(w.astype(jnp.float32), ((0, kp - k), (0, 0))).reshape(kp // group_size, group_size,
                                                                       n)
  lo = jnp.minimum(wf.min(axis=1), 0.0)  # [groups, N]
  hi = jnp.maximum(wf.max(axis=1), 0.0)
  scales = jnp.maximum((hi - lo) / INT4_MAX, MIN_SCALE)
  zeros = jnp.clip(jnp.round(-lo / scales), 0, INT4_MAX)
  q = jnp.clip(jnp.round(wf / scales[:, None, :]) + zeros[:, None, :], 0, INT4_MAX)
  return (q.reshape(kp, n).astype(jnp.uint8), scales.astype(jnp.float32),
          zeros.astype(jnp.uint8))


def pack_int4(codes: jax.Array, group_size: int) -> jax.Array:
  """codes uint8 [Kp, N] (0..15, Kp a group multiple) -> packed uint8 [Kp/2, N] (layout above)."""
  check_group_size(group_size)
  kp, n = codes.shape
  if kp % group_size:
    raise ValueError(f"{codes.shape=}: K must be a multiple of {group_size=}")
  g = codes.astype(jnp.uint8).reshape(kp // group_size, 2, group_size // 2, n)
  return (g[:, 0] | (g[:, 1] << 4)).reshape(kp // 2, n)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
  """Inverse of `pack_int4`: packed uint8 [Kp/2, N] -> codes uint8 [Kp, N]."""
  half = group_size // 2
  rows, n = packed.shape
  if rows % half:
    raise ValueError(f"{packed.shape=}: rows must be a multiple of {group_size=} / 2")
  p = packed.reshape(rows // half, half, n)
  return jnp.concatenate([p & 0xF, p >> 4], axis=1).reshape(2 * rows, n)


def dequantize_int4(codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                    group_size: int) -> jax.Array:
  """(codes [Kp, N] - zeros) * scales per group -> float32 [Kp, N]."""
  kp, n = codes.shape
  q = codes.astype(jnp.float32).reshape(kp // group_size, group_size, n)
  w = (q - zeros.astype(jnp.float32)[:, None, :]) * scales.astype(jnp.float32)[:, None, :]
  return w.reshape(kp, n)


def quantize_int4_packed(
    w: jax.Array, group_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """w [K, N] -> (packed uint8 [Kp/2, N], scales f32 [Kp/G, N], zeros uint8 [Kp/G, N])."""
  codes, scales, zeros = quantize_int4_grouped(w, group_size)
  return pack_int4(codes, group_size), scales, zeros


def fake_quantize_int4(w: jax.Array, group_size: int) -> jax.Array:
  """w [K, N] through int4 and back (float32 [K, N]): the error a layer sees, for AWQ's search."""
  codes, scales, zeros = quantize_int4_grouped(w, group_size)
  return dequantize_int4(codes, scales, zeros, group_size)[:w.shape[0]]
