"""Attention of a prefill chunk over the KV pages its sequence already holds (plain jnp).

A chunk of C query tokens at absolute positions [start, start + C) attends to every key of its
sequence at a position <= its own: the keys of earlier chunks (or of shared prefix pages) are
read back through the page table, the chunk's own keys were written into the pages just before.
This is the reference form (gathers the whole page table, accumulates in float32); the cost is
O(C x pages_per_seq x page_size) per row, which is what chunked prefill trades for bounded steps.
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
) -> jax.Array:
  """Causal GQA over the paged sequence: query at position p sees keys 0..p -> [B, C, N, H]."""
  b, c, n, h = q.shape
  kv = k_pages.shape[0]
  if n % kv:
    raise ValueError(f"{q.shape=}: heads {n} must be a multiple of kv heads {kv}")
  k = _gather(k_pages, k_scale, page_table)  # [K, B, S, H]
  v = _gather(v_pages, v_scale, page_table)
  qg = q.reshape(b, c, kv, n // kv, h).astype(jnp.float32)
  s = jnp.einsum("BCKGH,KBSH->BKGCS", qg, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(h)
  visible = jnp.arange(k.shape[2])[None, None, :] <= positions[:, :, None]  # [B, C, S]
  w = jax.nn.softmax(jnp.where(visible[:, None, None], s, MASK_VALUE), axis=-1)
  o = jnp.einsum("BKGCS,KBSH->BCKGH", w, v, precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, c, n, h).astype(q.dtype)
