"""Decode-step attention over a paged KV cache (Triton back end).

One query token per sequence reads its keys and values through a page table:
`page_table[b, i]` is the page holding tokens [i * page_size, (i + 1) *
page_size) of sequence `b`. GQA: query head `h` reads kv head
`h // (heads // kv_heads)`. Only the first `lengths[b]` tokens are read into
the output (later page-table entries may point anywhere valid, e.g. page 0); a
length of 0 outputs zeros. An int8 cache carries float32 scales per token per
kv head and is dequantized inside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tuned_block_sizes
from pallas_kernels.common import LOG2_E, MASK_VALUE, MIN_DOT_DIM, is_pow2
from pallas_kernels.dispatch import Impl, check_impl, dispatch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tile sizes and Triton launch parameters for `paged_attention`.

  `block_h` query heads of one kv-head group share a program (padded to >= 16
  rows for Triton's dot); each loop step reads `pages_per_compute_block` pages,
  raised at trace time until a step covers >= 16 tokens.
  """

  block_h: int = 16
  pages_per_compute_block: int = 8
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if not is_pow2(self.block_h) or self.block_h < MIN_DOT_DIM:
      raise ValueError(
          f"block_h={self.block_h} must be a power of two >= {MIN_DOT_DIM}")
    if not is_pow2(self.pages_per_compute_block):
      raise ValueError(
          f"pages_per_compute_block={self.pages_per_compute_block} must be a"
          " power of two")
    if not is_pow2(self.num_warps):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")


def default_block_sizes(
    page_size: int, head_dim: int, cache_dtype: jnp.dtype,
    *,
    device_kind: str | None = None,
) -> BlockSizes:
  """Block sizes from the tuned table for this device and shape class.

  `device_kind` defaults to `common.device_kind()`; unknown devices and shapes
  get the table's safe fallback (the `BlockSizes()` defaults).
  """
  entry = tuned_block_sizes.lookup(
      "paged_attention",
      tuned_block_sizes.paged_shape_class(page_size, head_dim),
      jnp.dtype(cache_dtype).name, device_kind=device_kind)
  return BlockSizes(**entry)


def _kernel(
    q_ref,  # [block_h, head_dim]                       query heads of one group
    k_pages_ref,  # [num_pages, page_size, head_dim]    one kv head's pages
    k_scale_ref,  # [num_pages, page_size] f32, or None (float cache)
    v_pages_ref,  # [num_pages, page_size, head_dim]
    v_scale_ref,  # [num_pages, page_size] f32, or None
    page_table_ref,  # [pages_per_seq] int32           this sequence's row
    lengths_ref,  # [1] int32                          valid tokens
    o_ref,  # [block_h, head_dim]
    *,
    sm_scale: float,
    pages_per_block: int,
    max_len: int,  # pages_per_seq * page_size before padding the table
):
  block_h, head_dim = q_ref.shape
  page_size = k_pages_ref.shape[1]
  block_k = pages_per_block * page_size
  length = jnp.clip(lengths_ref[0], 0, max_len)
  num_blocks = lax.div(length + (block_k - 1), block_k)
  q = q_ref[...]
  scale = sm_scale * LOG2_E  # exp2 domain: e^x = 2^(x log2 e)

  def body(j, carry):
    acc, m_prev, l_prev = carry  # [block_h, d], [block_h], [block_h]
    pages = page_table_ref[pl.ds(j * pages_per_block, pages_per_block)]
    k = k_pages_ref[pages].reshape(block_k, head_dim).astype(q.dtype)
    v = v_pages_ref[pages].reshape(block_k, head_dim).astype(q.dtype)
    valid = j * block_k + jnp.arange(block_k) < length  # [block_k]
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32)  # [block_h, block_k]
    if k_scale_ref is not None:
      s = s * k_scale_ref[pages].reshape(1, block_k)
    s = jnp.where(valid[None, :], s * scale, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=-1)
    if v_scale_ref is not None:
      # Scales run along the reduction axis: fold them into the weights.
      v_scale = v_scale_ref[pages].reshape(block_k)
      p = p * jnp.where(valid, v_scale, 0.0)[None, :]
    v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_next, l_next

  acc = jnp.zeros((block_h, head_dim), jnp.float32)
  m = jnp.full((block_h,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_h,), jnp.float32)
  acc, m, l = lax.fori_loop(0, num_blocks, body, (acc, m, l))
  # l == 0 only when length == 0: acc is 0 there, so the output is 0.
  out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
  o_ref[...] = out.astype(o_ref.dtype)


def _validate(q, k_pages, v_pages, page_table, lengths, k_scale, v_scale):
  if q.ndim != 3 or k_pages.ndim != 4:
    raise ValueError(
        f"{q.shape=} must be [batch, heads, head_dim] and {k_pages.shape=}"
        " [kv_heads, num_pages, page_size, head_dim]")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"{v_pages.shape=} must equal {k_pages.shape=}")
  batch, heads, head_dim = q.shape
  kv_heads, num_pages, page_size, _ = k_pages.shape
  if k_pages.shape[3] != head_dim:
    raise ValueError(f"{q.shape=} and {k_pages.shape=} differ in head_dim")
  if heads % kv_heads:
    raise ValueError(
        f"heads of {q.shape=} must be a multiple of kv_heads of"
        f" {k_pages.shape=}")
  if min(num_pages, page_size, head_dim) < 1 or not is_pow2(page_size):
    raise ValueError(
        f"{k_pages.shape=} must be non-empty with a power-of-two page_size")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"{q.dtype=} must be floating")
  if (page_table.ndim != 2 or page_table.shape[0] != batch
      or page_table.shape[1] < 1 or page_table.dtype != jnp.int32):
    raise ValueError(
        f"{page_table.shape=} {page_table.dtype=} must be int32"
        f" [{batch}, pages_per_seq >= 1] for {q.shape=}")
  if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
    raise ValueError(
        f"{lengths.shape=} {lengths.dtype=} must be int32 [{batch}]"
        f" for {q.shape=}")
  for name, pages, scale in (("k", k_pages, k_scale), ("v", v_pages, v_scale)):
    if pages.dtype == jnp.int8:
      if scale is None:
        raise ValueError(f"int8 {name}_pages needs {name}_scale")
      if scale.shape != pages.shape[:3] or scale.dtype != jnp.float32:
        raise ValueError(
            f"{name}_scale {scale.shape} {scale.dtype} must be float32"
            f" {pages.shape[:3]} for {name}_pages {pages.shape}")
    elif not jnp.issubdtype(pages.dtype, jnp.floating):
      raise ValueError(f"{name}_pages dtype {pages.dtype} must be float or int8")
    elif scale is not None:
      raise ValueError(
          f"{name}_scale is only for int8 {name}_pages, not {pages.dtype}")


def _paged_attention_pallas(
    q, k_pages, v_pages, page_table, lengths, k_scale, v_scale, *, sm_scale,
    block_sizes, interpret):
  """Groups query heads by kv head, pads to block multiples, runs `_kernel`."""
  batch, heads, head_dim = q.shape
  kv_heads, num_pages, page_size, _ = k_pages.shape
  pages_per_seq = page_table.shape[1]
  group = heads // kv_heads
  d = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))
  block_h = min(block_sizes.block_h,
                max(MIN_DOT_DIM, pl.next_power_of_2(group)))
  group_pad = pl.cdiv(group, block_h) * block_h
  pages_per_block = max(
      min(block_sizes.pages_per_compute_block,
          pl.next_power_of_2(pages_per_seq)),
      pl.cdiv(MIN_DOT_DIM, page_size))
  table_pad = pl.cdiv(pages_per_seq, pages_per_block) * pages_per_block

  q = q.reshape(batch, kv_heads, group, head_dim)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, group_pad - group), (0, d - head_dim)))
  if d != head_dim:  # Copies the cache: only for non-power-of-two head_dim.
    pad_d = ((0, 0), (0, 0), (0, 0), (0, d - head_dim))
    k_pages, v_pages = jnp.pad(k_pages, pad_d), jnp.pad(v_pages, pad_d)
  page_table = jnp.pad(page_table, ((0, 0), (0, table_pad - pages_per_seq)))

  pages_spec = pl.BlockSpec(
      (None, num_pages, page_size, d), lambda b, h, g: (h, 0, 0, 0))
  scale_spec = pl.BlockSpec(
      (None, num_pages, page_size), lambda b, h, g: (h, 0, 0))
  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, pages_per_block=pages_per_block,
      max_len=pages_per_seq * page_size)
  out = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, group_pad // block_h),
      in_specs=[
          pl.BlockSpec((None, None, block_h, d), lambda b, h, g: (b, h, g, 0)),
          pages_spec,
          None if k_scale is None else scale_spec,
          pages_spec,
          None if v_scale is None else scale_spec,
          pl.BlockSpec((None, table_pad), lambda b, h, g: (b, 0)),
          pl.BlockSpec((1,), lambda b, h, g: (b,)),
      ],
      out_specs=pl.BlockSpec(
          (None, None, block_h, d), lambda b, h, g: (b, h, g, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="paged_attention_decode",
  )(q, k_pages, k_scale, v_pages, v_scale, page_table, lengths)
  return out[:, :, :group, :head_dim].reshape(batch, heads, head_dim)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_sizes", "impl", "interpret"),
)
def paged_attention(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    page_table: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32
    *,
    k_scale: jax.Array | None = None,  # [kv_heads, num_pages, page_size] f32
    v_scale: jax.Array | None = None,  # [kv_heads, num_pages, page_size] f32
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    impl: Impl = "auto",
    interpret: bool = False,
) -> jax.Array:
  """One decode step of attention over a paged cache -> [batch, heads, head_dim].

  `sm_scale` defaults to 1/sqrt(head_dim). int8 pages need their `*_scale`
  (value = int8 * scale). `impl`: "auto" (kernel on CUDA, reference
  elsewhere), "pallas", "xla"; `interpret=True` with impl="pallas" runs the
  kernel on CPU.
  """
  check_impl(impl)
  _validate(q, k_pages, v_pages, page_table, lengths, k_scale, v_scale)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  if block_sizes is None:
    block_sizes = default_block_sizes(
        k_pages.shape[2], q.shape[2], k_pages.dtype)
  pallas_fn = functools.partial(
      _paged_attention_pallas, sm_scale=sm_scale, block_sizes=block_sizes,
      interpret=interpret)
  xla_fn = functools.partial(_paged_attention_reference, sm_scale=sm_scale)
  with jax.named_scope("paged_attention"):
    return dispatch(
        impl, q, k_pages, v_pages, page_table, lengths, k_scale, v_scale,
        pallas_fn=pallas_fn, xla_fn=xla_fn)


def _gather_pages(pages, page_table, scale):
  """[kv_heads, num_pages, page_size, d] -> f32 [batch, kv_heads, seq, d]."""
  x = pages.astype(jnp.float32)
  if scale is not None:
    x = x * scale[..., None]
  x = x[:, page_table]  # [kv_heads, batch, pages_per_seq, page_size, d]
  kv_heads, batch, pages_per_seq, page_size, d = x.shape
  x = x.reshape(kv_heads, batch, pages_per_seq * page_size, d)
  return jnp.swapaxes(x, 0, 1)


def _paged_attention_reference(
    q, k_pages, v_pages, page_table, lengths, k_scale, v_scale, *, sm_scale):
  batch, heads, head_dim = q.shape
  kv_heads = k_pages.shape[0]
  k = _gather_pages(k_pages, page_table, k_scale)
  v = _gather_pages(v_pages, page_table, v_scale)
  qg = q.astype(jnp.float32).reshape(batch, kv_heads, heads // kv_heads,
                                     head_dim)
  logits = jnp.einsum(
      "bkgd,bksd->bkgs", qg, k, precision=lax.Precision.HIGHEST) * sm_scale
  valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [batch, seq]
  weights = jax.nn.softmax(
      jnp.where(valid[:, None, None, :], logits, MASK_VALUE), axis=-1)
  v = jnp.where(valid[:, None, :, None], v, 0.0)
  out = jnp.einsum("bkgs,bksd->bkgd", weights, v,
                   precision=lax.Precision.HIGHEST)
  return out.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_attention_reference(
    q: jax.Array,  # [batch, heads, head_dim]
    k_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    v_pages: jax.Array,  # [kv_heads, num_pages, page_size, head_dim]
    page_table: jax.Array,  # [batch, pages_per_seq] int32
    lengths: jax.Array,  # [batch] int32
    *,
    k_scale: jax.Array | None = None,  # [kv_heads, num_pages, page_size] f32
    v_scale: jax.Array | None = None,  # [kv_heads, num_pages, page_size] f32
    sm_scale: float | None = None,
) -> jax.Array:
  """Plain-jnp `paged_attention`: gathers the pages, float32 softmax."""
  _validate(q, k_pages, v_pages, page_table, lengths, k_scale, v_scale)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  return _paged_attention_reference(
      q, k_pages, v_pages, page_table, lengths, k_scale, v_scale,
      sm_scale=sm_scale)
