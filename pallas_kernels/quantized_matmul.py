"""Quantized matmul (Pallas, Triton back end): int8 or fp8 weights with per-output-channel scales.

Modes: "w8a16" (int8 weights, float activations), "w8a8" (activations quantized per row inside the
kernel, int8 x int8 -> int32), "fp8" (float8_e4m3fn weights). Grid (M/block_m, N/block_n, split_k);
each program reduces its share of K in a `fori_loop` over `pl.ds` slices (Triton programs cannot
share an accumulator across a grid axis, so split_k > 1 writes float32 partials summed by XLA).
Weights are padded per call only when K or N is not a block multiple: keep serving weights aligned.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import MIN_DOT_DIM, is_pow2
from pallas_kernels.dispatch import check_impl, dispatch
from pallas_kernels.quantize import INT8_MAX, int8_symmetric_codes, quantize_activations_int8

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("w8a16", "w8a8", "fp8")
_WEIGHT_DTYPES = {
    "w8a16": jnp.dtype(jnp.int8),
    "w8a8": jnp.dtype(jnp.int8),
    "fp8": jnp.dtype(jnp.float8_e4m3fn),
}

@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and launch parameters; block_* are powers of two >= 16, clamped to the problem."""

  block_m: int = 64
  block_n: int = 64
  block_k: int = 64
  split_k: int = 1  # > 1 splits K over a grid axis; pays off at decode (M <= 16) shapes.
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if not is_pow2(value) or value < MIN_DOT_DIM:
        raise ValueError(f"{name}={value} must be a power of two >= {MIN_DOT_DIM}")
    if self.split_k < 1:
      raise ValueError(f"{self.split_k=} must be >= 1")
    if not is_pow2(self.num_warps):
      raise ValueError(f"{self.num_warps=} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")


def _kernel(
    x_ref,  # [block_m, k_padded] activations (float), the whole K of this row block
    w_ref,  # [k_padded, block_n] int8 or float8_e4m3fn weights
    w_scale_ref,  # [block_n] float32 per-output-channel scales
    o_ref,  # [block_m, block_n] output (or this split's float32 partial)
    *,
    mode: str,
    block_k: int,
    k_steps: int,  # K blocks reduced by one program
    compute_dtype: jnp.dtype,
):
  block_m, block_n = o_ref.shape
  k_first = pl.program_id(2) * k_steps

  def x_tile(t):
    return x_ref[:, pl.ds(t * block_k, block_k)]  # [block_m, block_k]

  def w_tile(t):
    return w_ref[pl.ds(t * block_k, block_k), :]  # [block_k, block_n]

  if mode == "w8a8":
    # Pass 1: the row scale needs max|x| over the whole K, not just this split's share.
    def amax_body(t, amax):
      return jnp.maximum(amax, jnp.max(jnp.abs(x_tile(t).astype(jnp.float32)), axis=1))

    num_k_blocks = x_ref.shape[1] // block_k
    amax = lax.fori_loop(0, num_k_blocks, amax_body, jnp.zeros((block_m,), jnp.float32))

    def body(t, acc):
      x_q = int8_symmetric_codes(x_tile(k_first + t).astype(jnp.float32), amax[:, None])
      return acc + jnp.dot(
          x_q.astype(jnp.int8), w_tile(k_first + t), preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, k_steps, body, jnp.zeros((block_m, block_n), jnp.int32))
    out = acc.astype(jnp.float32) * (amax / INT8_MAX)[:, None]
  else:
    def body(t, acc):
      x = x_tile(k_first + t).astype(compute_dtype)
      w = w_tile(k_first + t).astype(compute_dtype)
      # f32 operands: IEEE products (Triton's DEFAULT precision would be TF32, ~1e-3 error).
      precision = lax.Precision.HIGHEST if compute_dtype == jnp.float32 else None
      return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

    out = lax.fori_loop(0, k_steps, body, jnp.zeros((block_m, block_n), jnp.float32))
  o_ref[...] = (out * w_scale_ref[...][None, :]).astype(o_ref.dtype)


def _check_args(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}")
  if x.ndim != 2 or w_q.ndim != 2:
    raise ValueError(f"{x.shape=} must be [M, K] and {w_q.shape=} must be [K, N]")
  if min(x.shape + w_q.shape) < 1:
    raise ValueError(f"{x.shape=} and {w_q.shape=} must not be empty")
  if x.shape[1] != w_q.shape[0]:
    raise ValueError(f"{x.shape=} and {w_q.shape=} disagree on K")
  if w_scale.shape != (w_q.shape[1],):
    raise ValueError(f"{w_scale.shape=} must be [N] = ({w_q.shape[1]},)")
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
    raise ValueError(f"{x.dtype=} must be float32, bfloat16 or float16")
  if w_q.dtype != _WEIGHT_DTYPES[mode]:
    raise ValueError(f"{w_q.dtype=} must be {_WEIGHT_DTYPES[mode]} for {mode=}")
  if not jnp.issubdtype(w_scale.dtype, jnp.floating):
    raise ValueError(f"{w_scale.dtype=} must be floating")


def default_block_sizes(
    m: int, k: int, n: int, mode: str, x_dtype: jnp.dtype, *, device_kind: str | None = None
) -> BlockSizes:
  """Block sizes from the tuned table for this device and shape class (safe fallback included)."""
  entry = tuned_block_sizes.lookup(
      "quantized_matmul", tuned_block_sizes.matmul_shape_class(m, k, n),
      f"{mode}:{jnp.dtype(x_dtype).name}", device_kind=device_kind)
  return BlockSizes(**entry)


def _quantized_matmul_pallas(
    x: jax.Array,  # [M, K]
    w_q: jax.Array,  # [K, N]
    w_scale: jax.Array,  # [N]
    *,
    mode: str,
    block_sizes: BlockSizes,
    interpret: bool,
    out_dtype: jnp.dtype,
) -> jax.Array:
  m, k = x.shape
  n = w_q.shape[1]
  min_k = 2 * MIN_DOT_DIM if mode == "w8a8" else MIN_DOT_DIM  # int8 MMA tiles are k=32 deep.
  block_m = min(block_sizes.block_m, max(MIN_DOT_DIM, pl.next_power_of_2(m)))
  block_n = min(block_sizes.block_n, max(MIN_DOT_DIM, pl.next_power_of_2(n)))
  block_k = min(max(block_sizes.block_k, min_k), max(min_k, pl.next_power_of_2(k)))
  k_blocks = pl.cdiv(k, block_k)
  split_k = min(block_sizes.split_k, k_blocks)
  k_steps = pl.cdiv(k_blocks, split_k)
  m_pad, n_pad = pl.cdiv(m, block_m) * block_m, pl.cdiv(n, block_n) * block_n
  k_pad = k_steps * split_k * block_k
  if (m_pad, k_pad) != (m, k):
    x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))
  if (k_pad, n_pad) != (k, n):
    logger.debug("padding weights %s to %s per call", (k, n), (k_pad, n_pad))
    w_q = jnp.pad(w_q, ((0, k_pad - k), (0, n_pad - n)))
  w_scale = jnp.pad(w_scale.astype(jnp.float32), (0, n_pad - n))

  compute_dtype = x.dtype  # bf16/f16 -> tensor-core MMA; f32 -> IEEE dot (no silent TF32).
  kernel = functools.partial(
      _kernel, mode=mode, block_k=block_k, k_steps=k_steps, compute_dtype=compute_dtype)
  grid = (m_pad // block_m, n_pad // block_n, split_k)
  partial_dtype = jnp.float32 if split_k > 1 else out_dtype
  out = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((block_m, k_pad), lambda i, j, s: (i, 0)),  # x
          pl.BlockSpec((k_pad, block_n), lambda i, j, s: (0, j)),  # w_q
          pl.BlockSpec((block_n,), lambda i, j, s: (j,)),  # w_scale
      ],
      out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
      out_shape=jax.ShapeDtypeStruct((split_k, m_pad, n_pad), partial_dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name=f"quantized_matmul_{mode}",
  )(x, w_q, w_scale)
  out = out[0] if split_k == 1 else out.sum(axis=0)
  return out[:m, :n].astype(out_dtype)


@functools.partial(
    jax.jit, static_argnames=("mode", "block_sizes", "impl", "interpret", "out_dtype"))
def quantized_matmul(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    mode: str,
    block_sizes: BlockSizes | None = None,
    impl: str = "auto",
    interpret: bool = False,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """x [M, K] @ dequant(w_q [K, N], w_scale [N]) -> [M, N] in out_dtype (default x.dtype).

  impl="auto" runs the Triton kernel on CUDA and the reference elsewhere; impl="pallas" with
  interpret=True runs the kernel on CPU. Any M, K, N (padded to blocks and sliced back).
  """
  check_impl(impl)
  _check_args(x, w_q, w_scale, mode)
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  m, k = x.shape
  n = w_q.shape[1]
  if block_sizes is None:
    block_sizes = default_block_sizes(m, k, n, mode, x.dtype)
  pallas_fn = functools.partial(
      _quantized_matmul_pallas, mode=mode, block_sizes=block_sizes, interpret=interpret,
      out_dtype=out_dtype)
  xla_fn = functools.partial(_reference, mode=mode, out_dtype=out_dtype)
  with jax.named_scope(f"quantized_matmul_{mode}"):
    return dispatch(impl, x, w_q, w_scale, pallas_fn=pallas_fn, xla_fn=xla_fn)


def _reference(
    x: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, mode: str, out_dtype: jnp.dtype
) -> jax.Array:
  if mode == "w8a8":
    x_q, x_scale = quantize_activations_int8(x)
    # Exact int32 accumulation. int32 operands, not int8: XLA GPU's int8 GEMM (jax 0.11.2, H100)
    # returned twice the product on a 2x2 case; the reference must not share such a path.
    acc = jnp.dot(x_q.astype(jnp.int32), w_q.astype(jnp.int32), preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * x_scale[:, None]
  else:
    # float32 operands: bf16/f16 x int8/fp8 products are exact in float32, so this is the kernel's
    # math up to summation order, and XLA CPU runs f32 dots ~10x faster than bf16 ones.
    out = jnp.dot(
        x.astype(jnp.float32), w_q.astype(jnp.float32), precision=lax.Precision.HIGHEST)
  return (out * w_scale.astype(jnp.float32)[None, :]).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("mode", "out_dtype"))
def quantized_matmul_reference(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    mode: str,
    out_dtype: jnp.dtype | None = None,
) -> jax.Array:
  """Plain-jnp quantized matmul: float32 accumulation (int32 for W8A8's int8 x int8)."""
  _check_args(x, w_q, w_scale, mode)
  return _reference(
      x, w_q, w_scale, mode=mode, out_dtype=jnp.dtype(x.dtype if out_dtype is None else out_dtype))
