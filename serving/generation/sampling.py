"""Batched next-token sampling with per-row parameters, traced into each engine executable.

One compiled function serves any mix of greedy and sampled rows: temperature 0 takes the
argmax; otherwise logits / temperature, cut to the top_k best (0: all) and then to the smallest
set whose probability reaches top_p (1.0: all), are sampled with key fold_in(key(seed), step),
so a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(
    logits: jax.Array,  # [B, V] float
    *,
    temperature: jax.Array,  # [B] float32, 0 = greedy
    top_k: jax.Array,  # [B] int32, 0 = off
    top_p: jax.Array,  # [B] float32, 1 = off
    seed: jax.Array,  # [B] int32
    step: jax.Array,  # [B] int32, index of the token being drawn
) -> jax.Array:
  """-> [B] int32 tokens."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1)
  x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ranked = -jnp.sort(-x, axis=-1)  # [B, V], descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
  in_k = jnp.arange(vocab)[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
  keep = jnp.sum(in_k & (before < top_p[:, None]), axis=-1)  # >= 1: the best is always kept
  threshold = jnp.take_along_axis(ranked, (keep - 1)[:, None], axis=-1)  # [B, 1]
  masked = jnp.where(x >= threshold, x, -jnp.inf)
  keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed, step)
  drawn = jax.vmap(jax.random.categorical)(keys, masked)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
