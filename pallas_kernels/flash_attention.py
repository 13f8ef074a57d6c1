"""Forward flash attention (Triton back end): online softmax over key blocks.

Serves the relevance cross-encoder (bidirectional, padded batches, seq 16-256)
and the decoder LM prefill (`causal=True`). GQA: query head `h` reads kv head
`h // (heads // kv_heads)`. `lengths[b]` is the valid length of sequence `b`,
shared by its queries and keys (a right-padded encoder batch): keys at positions
>= length get no weight (their values are never read into the output, even if
not finite) and query rows at positions >= length output zeros.
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
  """Tile sizes and Triton launch parameters for `flash_attention`.

  `block_q` and `block_k` are powers of two >= 16 (Triton's dot minimum); both
  are clamped down to the (power-of-two rounded) sequence length at trace time.
  """

  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not is_pow2(value) or value < MIN_DOT_DIM:
        raise ValueError(
            f"{name}={value} must be a power of two >= {MIN_DOT_DIM}")
    if not is_pow2(self.num_warps):
      raise ValueError(f"num_warps={self.num_warps} must be a power of two")
    if self.num_stages < 1:
      raise ValueError(f"num_stages={self.num_stages} must be >= 1")


def default_block_sizes(
    seq_k: int, head_dim: int, dtype: jnp.dtype,
    *,
    device_kind: str | None = None,
) -> BlockSizes:
  """Block sizes from the tuned table for this device and shape class.

  `device_kind` defaults to `common.device_kind()`; unknown devices and shapes
  get the table's safe fallback (the `BlockSizes()` defaults).
  """
  entry = tuned_block_sizes.lookup(
      "flash_attention", tuned_block_sizes.flash_shape_class(seq_k, head_dim),
      jnp.dtype(dtype).name, device_kind=device_kind)
  return BlockSizes(**entry)


def _kernel(
    q_ref,  # [block_q, head_dim]     one query block of one head
    k_ref,  # [seq_k, head_dim]       the whole (padded) key sequence, kv head
    v_ref,  # [seq_k, head_dim]
    lengths_ref,  # [1] int32 valid length of this sequence, or None
    o_ref,  # [block_q, head_dim]
    *,
    sm_scale: float,
    causal: bool,
    block_q: int,
    block_k: int,
    seq_q: int,  # unpadded lengths
    seq_k: int,
):
  iq = pl.program_id(0)
  q_pos = iq * block_q + jnp.arange(block_q)  # [block_q]
  if lengths_ref is None:
    q_len, k_len = seq_q, seq_k
    num_k_blocks = pl.cdiv(seq_k, block_k)
  else:
    length = lengths_ref[0]
    q_len = jnp.clip(length, 0, seq_q)
    k_len = jnp.clip(length, 0, seq_k)
    num_k_blocks = lax.div(k_len + (block_k - 1), block_k)
  if causal:
    # Query block iq sees keys < (iq + 1) * block_q only.
    last = lax.div((iq + 1) * block_q + (block_k - 1), block_k)
    num_k_blocks = jnp.minimum(num_k_blocks, last)

  q = q_ref[...]
  scale = sm_scale * LOG2_E  # exp2 domain: e^x = 2^(x log2 e)

  def body(j, carry):
    acc, m_prev, l_prev = carry  # [block_q, d], [block_q], [block_q]
    start = pl.multiple_of(j * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]  # [block_k, d]
    v = v_ref[pl.ds(start, block_k), :]
    s = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32) * scale  # [block_q, block_k]
    k_pos = start + jnp.arange(block_k)
    k_valid = k_pos < k_len  # [block_k]
    mask = k_valid[None, :]
    if causal:
      mask = jnp.logical_and(mask, q_pos[:, None] >= k_pos[None, :])
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
    alpha = jnp.exp2(m_prev - m_next)
    p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=-1)
    v = jnp.where(k_valid[:, None], v, jnp.zeros_like(v))
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_next, l_next

  acc = jnp.zeros(o_ref.shape, jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = lax.fori_loop(0, num_k_blocks, body, (acc, m, l))
  # l == 0 only for rows that saw no key (length 0): they are zeroed below.
  out = acc / jnp.where(l > 0.0, l, 1.0)[:, None]
  out = jnp.where((q_pos < q_len)[:, None], out, 0.0)
  o_ref[...] = out.astype(o_ref.dtype)


def _validate(q, k, v, lengths):
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(
        f"{q.shape=} must be [batch, heads, seq_q, head_dim] and {k.shape=}"
        " [batch, kv_heads, seq_k, head_dim]")
  if v.shape != k.shape:
    raise ValueError(f"{v.shape=} must equal {k.shape=}")
  batch, heads, seq_q, head_dim = q.shape
  if k.shape[0] != batch or k.shape[3] != head_dim:
    raise ValueError(
        f"{q.shape=} and {k.shape=} must agree on batch and head_dim")
  if heads % k.shape[1]:
    raise ValueError(
        f"heads of {q.shape=} must be a multiple of kv_heads of {k.shape=}")
  if seq_q < 1 or k.shape[2] < 1 or head_dim < 1:
    raise ValueError(f"{q.shape=} and {k.shape=} must be non-empty")
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(
      q.dtype, jnp.floating):
    raise ValueError(
        f"{q.dtype=}, {k.dtype=}, {v.dtype=} must be one floating dtype")
  if lengths is not None and (
      lengths.shape != (batch,) or lengths.dtype != jnp.int32):
    raise ValueError(
        f"{lengths.shape=} {lengths.dtype=} must be int32 [{batch}]"
        f" for {q.shape=}")


def _flash_attention_pallas(
    q, k, v, lengths, *, causal, sm_scale, block_sizes, interpret):
  """Pads to block multiples, runs `_kernel`, slices back."""
  batch, heads, seq_q, head_dim = q.shape
  kv_heads, seq_k = k.shape[1], k.shape[2]
  group = heads // kv_heads
  d = max(MIN_DOT_DIM, pl.next_power_of_2(head_dim))
  block_q = min(block_sizes.block_q,
                max(MIN_DOT_DIM, pl.next_power_of_2(seq_q)))
  block_k = min(block_sizes.block_k,
                max(MIN_DOT_DIM, pl.next_power_of_2(seq_k)))
  seq_q_pad = pl.cdiv(seq_q, block_q) * block_q
  seq_k_pad = pl.cdiv(seq_k, block_k) * block_k
  pad = lambda x, s: jnp.pad(
      x, ((0, 0), (0, 0), (0, s - x.shape[2]), (0, d - head_dim)))
  q, k, v = pad(q, seq_q_pad), pad(k, seq_k_pad), pad(v, seq_k_pad)

  kv_head = (lambda h: h) if group == 1 else (lambda h: lax.div(h, group))
  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, causal=causal, block_q=block_q,
      block_k=block_k, seq_q=seq_q, seq_k=seq_k)
  out = pl.pallas_call(
      kernel,
      grid=(seq_q_pad // block_q, batch, heads),
      in_specs=[
          pl.BlockSpec((None, None, block_q, d), lambda i, b, h: (b, h, i, 0)),
          pl.BlockSpec((None, None, seq_k_pad, d),
                       lambda i, b, h: (b, kv_head(h), 0, 0)),
          pl.BlockSpec((None, None, seq_k_pad, d),
                       lambda i, b, h: (b, kv_head(h), 0, 0)),
          None if lengths is None else pl.BlockSpec((1,), lambda i, b, h: (b,)),
      ],
      out_specs=pl.BlockSpec(
          (None, None, block_q, d), lambda i, b, h: (b, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(
          num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, lengths)
  return out[:, :, :seq_q, :head_dim]


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal", "sm_scale", "block_sizes", "impl", "interpret"),
)
def flash_attention(
    q: jax.Array,  # [batch, heads, seq_q, head_dim]
    k: jax.Array,  # [batch, kv_heads, seq_k, head_dim]
    v: jax.Array,  # [batch, kv_heads, seq_k, head_dim]
    *,
    lengths: jax.Array | None = None,  # [batch] int32
    causal: bool = False,
    sm_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    impl: Impl = "auto",
    interpret: bool = False,
) -> jax.Array:
  """softmax(q k^T * sm_scale) v -> [batch, heads, seq_q, head_dim], q.dtype.

  `sm_scale` defaults to 1/sqrt(head_dim); `causal` masks key j > query i
  (positions counted from 0 in both). Rows >= `lengths[b]` output zeros.
  `impl`: "auto" (kernel on CUDA, reference elsewhere), "pallas", "xla";
  `interpret=True` with impl="pallas" runs the kernel on CPU.
  """
  check_impl(impl)
  _validate(q, k, v, lengths)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  if block_sizes is None:
    block_sizes = default_block_sizes(k.shape[2], q.shape[3], q.dtype)
  pallas_fn = functools.partial(
      _flash_attention_pallas, causal=causal, sm_scale=sm_scale,
      block_sizes=block_sizes, interpret=interpret)
  xla_fn = functools.partial(
      _flash_attention_reference, causal=causal, sm_scale=sm_scale)
  with jax.named_scope("flash_attention"):
    return dispatch(
        impl, q, k, v, lengths, pallas_fn=pallas_fn, xla_fn=xla_fn)


def _flash_attention_reference(q, k, v, lengths, *, causal, sm_scale):
  batch, heads, seq_q, head_dim = q.shape
  kv_heads, seq_k = k.shape[1], k.shape[2]
  qg = q.astype(jnp.float32).reshape(
      batch, kv_heads, heads // kv_heads, seq_q, head_dim)
  logits = jnp.einsum(
      "bkgqd,bksd->bkgqs", qg, k.astype(jnp.float32),
      precision=lax.Precision.HIGHEST) * sm_scale
  q_pos, k_pos = jnp.arange(seq_q), jnp.arange(seq_k)
  if lengths is None:
    q_valid = jnp.ones((batch, seq_q), bool)
    k_valid = jnp.ones((batch, seq_k), bool)
  else:
    q_valid = q_pos[None, :] < lengths[:, None]  # [batch, seq_q]
    k_valid = k_pos[None, :] < lengths[:, None]  # [batch, seq_k]
  mask = k_valid[:, None, None, None, :]
  if causal:
    mask = jnp.logical_and(mask, q_pos[:, None] >= k_pos[None, :])
  weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  v = jnp.where(k_valid[:, None, :, None], v.astype(jnp.float32), 0.0)
  out = jnp.einsum(
      "bkgqs,bksd->bkgqd", weights, v, precision=lax.Precision.HIGHEST)
  out = jnp.where(q_valid[:, None, None, :, None], out, 0.0)
  return out.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def flash_attention_reference(
    q: jax.Array,  # [batch, heads, seq_q, head_dim]
    k: jax.Array,  # [batch, kv_heads, seq_k, head_dim]
    v: jax.Array,  # [batch, kv_heads, seq_k, head_dim]
    *,
    lengths: jax.Array | None = None,  # [batch] int32
    causal: bool = False,
    sm_scale: float | None = None,
) -> jax.Array:
  """Plain-jnp `flash_attention` (float32 math, whole softmax at once)."""
  _validate(q, k, v, lengths)
  if sm_scale is None:
    sm_scale = 1.0 / math.sqrt(q.shape[-1])
  return _flash_attention_reference(
      q, k, v, lengths, causal=causal, sm_scale=sm_scale)
