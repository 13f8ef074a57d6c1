"""Attention of a prefill chunk over the KV pages its sequence already holds (plain jnp).

A chunk of C query tokens at absolute positions [start, start + C) attends to every key of its
sequence at a position <= its own: the keys of earlier chunks (or of shared prefix pages) are
read back through the page table, the chunk's own keys were written into the pages just before.
Plain jnp, accumulating in float32, over key blocks up to the batch's largest position, so the
cost is O(C x context) per row; a Pallas kernel for it is future work.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.common import MASK_VALUE


def _gather(pages: jax.Array, scale: jax.Array | None, page_table: jax.Array) -> jax.Array:
  """pages [K, num_pages, ps, H] -> float32 [K, B, P * ps, H] in position order per row."""
  x = pages[:, page_table].astype(jnp.float32)  # [K, B, P, ps, H]
  if scale is not None:
    x = x * scale[:, page_table][..., None]  # int8 cache: one scale per token per kv head
  k, b, p, ps, h = x.shape
  return x.reshape(k, b, p * ps, h)


def paged_chunk_attention(
    q: jax.Array,  # [B, C, N, H], query heads of the chunk's tokens
    k_pages: jax.Array,  # [K, num_pages, page_size, H], one layer of the cache
    v_pages: jax.Array,  # [K, num_pages, page_size, H]
    page_table: jax.Array,  # [B, P] int32
    positions: jax.Array,  # [B, C] int32, absolute position of each query token
    *,
    k_scale: jax.Array | None = None,  # [K, num_pages, page_size] float32 (int8 cache)
    v_scale: jax.Array | None = None,
    block_keys: int = 64,
) -> jax.Array:
  """Causal GQA over the paged sequence: query at position p sees keys 0..p -> [B, C, N, H].

  Keys are visited in blocks of `block_keys` (whole pages) with an online softmax, and only up
  to the block holding the batch's largest position (a loop with a traced trip count): a chunk
  early in a prompt, or a short prompt, does not pay for the whole page table.
  """
  b, c, n, h = q.shape
  kv, _, ps, _ = k_pages.shape
  if n % kv:
    raise ValueError(f"{q.shape=}: heads {n} must be a multiple of kv heads {kv}")
  bp = max(1, block_keys // ps)  # pages per key block
  num_blocks = -(-page_table.shape[1] // bp)
  table = jnp.pad(page_table, ((0, 0), (0, num_blocks * bp - page_table.shape[1])))  # null page
  qg = q.reshape(b, c, kv, n // kv, h).astype(jnp.float32) / math.sqrt(h)
  hi = jax.lax.Precision.HIGHEST

  def block(j, carry):
    m, l, acc = carry  # m, l [B, K, G, C]; acc [B, K, G, C, H]
    cols = jax.lax.dynamic_slice_in_dim(table, j * bp, bp, axis=1)  # [B, bp]
    k = _gather(k_pages, k_scale, cols)  # [K, B, bp * ps, H]
    v = _gather(v_pages, v_scale, cols)
    s = jnp.einsum("BCKGH,KBSH->BKGCS", qg, k, precision=hi)
    key_pos = j * bp * ps + jnp.arange(bp * ps)
    visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, C, S]
    s = jnp.where(visible[:, None, None], s, MASK_VALUE)
    # Block 0 holds key 0, visible to every query: m is a real score from then on.
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum("BKGCS,KBSH->BKGCH", p, v, precision=hi)
    return m_new, l * corr + p.sum(axis=-1), acc

  g = n // kv
  init = (jnp.full((b, kv, g, c), MASK_VALUE, jnp.float32), jnp.zeros((b, kv, g, c), jnp.float32),
          jnp.zeros((b, kv, g, c, h), jnp.float32))
  last = jnp.clip(jnp.max(positions) // (bp * ps) + 1, 1, num_blocks)
  _, l, acc = jax.lax.fori_loop(0, last, block, init)
  o = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # [B, C, K, G, H]
  return o.reshape(b, c, n, h).astype(q.dtype)
