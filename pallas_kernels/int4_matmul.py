"""int4 weight-only matmul (Pallas, Triton back end): packed 4-bit weights, per-group scales and zeros.

x [M, K] (float32 / bfloat16 / float16) @ dequant(packed [Kp/2, N] uint8) -> [M, N]. Weights are
grouped along K (`group_size` rows, Kp = K rounded up to a group multiple) and asymmetric: w =
(q - zero) * scale, q and zero in 0..15, one float32 scale and one uint8 zero per (group, column);
the packed layout is `pallas_kernels.quantize_int4`'s (two codes per byte, halves of a group).
Grid (M/block_m, N/block_n); each program walks K in `fori_loop` steps of block_k rows and, per
group, dequantizes the low and high nibbles in registers and runs two half-group dots, scaling the
group's float32 partial by its column scales (the weights are never materialized in memory).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import MIN_DOT_DIM, is_pow2
from pallas_kernels.dispatch import check_impl, dispatch
from pallas_kernels.quantize_int4 import check_group_size, dequantize_int4, padded_k, unpack_int4

logger = logging.getLogger(__name__)

# Shape class (as tuned_block_sizes.matmul_shape_class) -> block parameters. Heuristics, not yet
# measured on a GPU; block_k is raised to group_size where smaller.
DEFAULT_BLOCKS = types.MappingProxyType({
    "decode": types.MappingProxyType(dict(block_m=16, block_n=64, block_k=128)),
    "small": types.MappingProxyType(dict(block_m=64, block_n=64, block_k=128)),
    "large": types.MappingProxyType(dict(block_m=128, block_n=128, block_k=128, num_warps=8)),
})


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and launch parameters; block_* are powers of two >= 16, clamped to the problem."""

  block_m: int = 64
  block_n: int = 64
  block_k: int = 128  # K rows per loop step; a multiple of group_size (raised to it if smaller)
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if not is_pow2(value) or value < MIN_DOT_DIM:
        raise ValueError(f"{name}={value} must be a power of two >= {MIN_DOT_DIM}")
    if not is_pow2(self.num_warps):
      raise ValueError(f"{self.num_warps=} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")


def _kernel(
    x_ref,  # [block_m, k_pad] activations, the whole (padded) K of this row block
    packed_ref,  # [k_pad // 2, block_n] uint8, two int4 codes per byte
    scales_ref,  # [k_pad // group_size, block_n] float32
    zeros_ref,  # [k_pad // group_size, block_n] uint8
    o_ref,  # [block_m, block_n]
    *,
    group_size: int,
    groups_per_step: int,
    compute_dtype: jnp.dtype,
):
  block_m, block_n = o_ref.shape
  half = group_size // 2
  precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None

  def group(g, acc):
    p = packed_ref[pl.ds(g * half, half), :].astype(jnp.int32)  # [half, block_n]
    zero = zeros_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, block_n]
    scale = scales_ref[pl.ds(g, 1), :]  # [1, block_n]
    w_lo = ((p & 0xF).astype(jnp.float32) - zero).astype(compute_dtype)  # rows g*G .. g*G+half
    w_hi = ((p >> 4).astype(jnp.float32) - zero).astype(compute_dtype)  # rows g*G+half .. (g+1)*G
    x_lo = x_ref[:, pl.ds(g * group_size, half)].astype(compute_dtype)  # [block_m, half]
    x_hi = x_ref[:, pl.ds(g * group_size + half, half)].astype(compute_dtype)
    part = jnp.dot(x_lo, w_lo, preferred_element_type=jnp.float32, precision=precision)
    part += jnp.dot(x_hi, w_hi, preferred_element_type=jnp.float32, precision=precision)
    return acc + part * scale

  def step(t, acc):
    for i in range(groups_per_step):  # unrolled: block_k // group_size groups per step
      acc = group(t * groups_per_step + i, acc)
    return acc

  steps = scales_ref.shape[0] // groups_per_step
  acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _check_args(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array,
                group_size: int) -> None:
  check_group_size(group_size)
  if x.ndim != 2 or packed.ndim != 2:
    raise ValueError(f"{x.shape=} must be [M, K] and {packed.shape=} must be [Kp/2, N]")
  if any(isinstance(d, int) and d < 1 for d in x.shape + packed.shape):  # M may be symbolic
    raise ValueError(f"{x.shape=} and {packed.shape=} must not be empty")
  kp = padded_k(x.shape[1], group_size)
  if packed.shape[0] * 2 != kp:
    raise ValueError(f"{x.shape=} and {packed.shape=} disagree on K: packed rows must be"
                     f" {kp // 2} (K padded to a multiple of {group_size=}, halved)")
  want = (kp // group_size, packed.shape[1])
  for name, arr in (("scales", scales), ("zeros", zeros)):
    if arr.shape != want:
      raise ValueError(f"{name}.shape={arr.shape} must be [Kp/group_size, N] = {want}")
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
    raise ValueError(f"{x.dtype=} must be float32, bfloat16 or float16")
  if packed.dtype != jnp.uint8 or zeros.dtype != jnp.uint8:
    raise ValueError(f"{packed.dtype=} and {zeros.dtype=} must be uint8")
  if not jnp.issubdtype(scales.dtype, jnp.floating):
    raise ValueError(f"{scales.dtype=} must be floating")


def default_block_sizes(m: int) -> BlockSizes:
  """Block sizes for an M-row problem from DEFAULT_BLOCKS (decode <= 16 rows, small <= 256)."""
  shape_class = "decode" if m <= 16 else "small" if m <= 256 else "large"
  return BlockSizes(**DEFAULT_BLOCKS[shape_class])


def _int4_matmul_pallas(
    x: jax.Array,  # [M, K]
    packed: jax.Array,  # [Kp/2, N] uint8
    scales: jax.Array,  # [Kp/G, N]
    zeros: jax.Array,  # [Kp/G, N] uint8
    *,
    group_size: int,
    block_sizes: BlockSizes,
    interpret: bool,
    out_dtype: jnp.dtype,
) -> jax.Array:
  m, k = x.shape
  n = packed.shape[1]
  block_m = min(block_sizes.block_m, max(MIN_DOT_DIM, pl.next_power_of_2(m)))
  block_n = min(block_sizes.block_n, max(MIN_DOT_DIM, pl.next_power_of_2(n)))
  groups = scales.shape[0]
  groups_per_step = min(max(1, block_sizes.block_k // group_size), groups)
  groups_pad = pl.cdiv(groups, groups_per_step) * groups_per_step
  k_pad = groups_pad * group_size
  m_pad, n_pad = pl.cdiv(m, block_m) * block_m, pl.cdiv(n, block_n) * block_n
  x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
  if (groups_pad, n_pad) != (groups, n):
    logger.debug("padding int4 weights %s to %s per call", (groups, n), (groups_pad, n_pad))
    packed = jnp.pad(packed, ((0, (k_pad - 2 * packed.shape[0]) // 2), (0, n_pad - n)))
    zeros = jnp.pad(zeros, ((0, groups_pad - groups), (0, n_pad - n)))
  scales = jnp.pad(scales.astype(jnp.float32), ((0, groups_pad - groups), (0, n_pad - n)))
  kernel = functools.partial(_kernel, group_size=group_size, groups_per_step=groups_per_step,
                             compute_dtype=x.dtype)
  out = pl.pallas_call(
      kernel,
      grid=(m_pad // block_m, n_pad // block_n),
      in_specs=[
          pl.BlockSpec((block_m, k_pad), lambda i, j: (i, 0)),  # x
          pl.BlockSpec((k_pad // 2, block_n), lambda i, j: (0, j)),  # packed
          pl.BlockSpec((groups_pad, block_n), lambda i, j: (0, j)),  # scales
          pl.BlockSpec((groups_pad, block_n), lambda i, j: (0, j)),  # zeros
      ],
      out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name=f"int4_matmul_g{group_size}",
  )(x, packed, scales, zeros)
  return out[:m, :n]


@functools.partial(
    jax.jit, static_argnames=("group_size", "block_sizes", "impl", "interpret", "out_dtype"))
def int4_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    *,
    group_size: int,
    block_sizes: BlockSizes | None = None,
    impl: str = "auto",
    interpret: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """x [M, K] @ dequant(packed [Kp/2, N], scales, zeros [Kp/G, N]) -> [M, N] (default x.dtype).

  impl="auto" runs the Triton kernel on CUDA and the reference elsewhere; impl="pallas" with
  interpret=True runs the kernel on CPU. Any M, K, N (padded to blocks and sliced back).
  """
  check_impl(impl)
  _check_args(x, packed, scales, zeros, group_size)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  if block_sizes is None and impl != "xla":  # (M may be symbolic when only the reference runs)
    block_sizes = default_block_sizes(x.shape[0])
  pallas_fn = functools.partial(
      _int4_matmul_pallas, group_size=group_size, block_sizes=block_sizes, interpret=interpret,
      out_dtype=out_dtype)
  xla_fn = functools.partial(_reference, group_size=group_size, out_dtype=out_dtype)
  with jax.named_scope(f"int4_matmul_g{group_size}"):
    return dispatch(impl, x, packed, scales, zeros, pallas_fn=pallas_fn, xla_fn=xla_fn)


def _reference(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: jax.Array, *,
               group_size: int, out_dtype: jnp.dtype) -> jax.Array:
  w = dequantize_int4(unpack_int4(packed, group_size), scales, zeros, group_size)  # [Kp, N] f32
  x32 = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, w.shape[0] - x.shape[1])))
  return jnp.dot(x32, w, precision=lax.Precision.HIGHEST).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype"))
def int4_matmul_reference(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    zeros: jax.Array,
    *,
    group_size: int,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """Plain-jnp int4 matmul: unpack, dequantize to float32, one float32 dot."""
  _check_args(x, packed, scales, zeros, group_size)
  return _reference(x, packed, scales, zeros, group_size=group_size,
                    out_dtype=jnp.dtype(x.dtype if out_dtype is None else out_dtype))
