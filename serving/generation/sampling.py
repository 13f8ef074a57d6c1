"""Batched next-token sampling with per-row parameters, traced into each engine executable.

One compiled function serves any mix of greedy and sampled rows: temperature 0 takes the
argmax; otherwise logits / temperature, cut to the top_k best (0: all) and then to the smallest
set whose probability reaches top_p (1.0: all), are sampled by the Gumbel-max trick with noise
hashed from (seed, step, token id), so a seeded request draws the same tokens whatever else
shares its batch. The counter hash (murmur3's finalizer) stands in for jax.random: threefry
keys per row cost about a second of compile time per executable on CPU.

`token_logprobs` reports the sampled token's log-probability and the `k` best alternatives as
the raw log-softmax of the model's logits (vLLM's default "raw_logprobs": before temperature,
top_k and top_p); it is an extra output beside the tokens and never changes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mix(x: jax.Array) -> jax.Array:
  """murmur3 fmix32: a bijection on uint32 that scrambles every bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform_noise(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
  """[B] seeds, [B] steps -> [B, vocab] float32 in (0, 1), a pure function of its inputs."""
  h = _mix(seed.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + jnp.uint32(0x7F4A7C15))
  h = _mix(h ^ (step.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)))
  ids = jnp.arange(vocab, dtype=jnp.uint32) * jnp.uint32(0xC2B2AE3D) + jnp.uint32(1)
  x = _mix(h[:, None] ^ ids[None, :])
  return ((x >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(
    logits: jax.Array,  # [B, V] float
    temperature: jax.Array,  # [B] float32, 0 = greedy
    top_k: jax.Array,  # [B] int32, 0 = off
    top_p: jax.Array,  # [B] float32, 1 = off
) -> jax.Array:
  """Logits / temperature with every token outside top_k and top_p at -inf -> [B, V] float32;
  softmax of it is the distribution a sampled row draws from (`sample_tokens`, verification)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  ranked = -jnp.sort(-x, axis=-1)  # [B, V], descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
  in_k = jnp.arange(vocab)[None, :] < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_k, ranked, -jnp.inf), axis=-1)
  # Probability of the better-ranked tokens (an exclusive cumsum; a matmul compiles faster).
  before = probs @ jnp.triu(jnp.ones((vocab, vocab), jnp.float32), k=1)
  keep = jnp.sum(in_k & (before < top_p[:, None]), axis=-1)  # >= 1: the best is always kept
  threshold = jnp.take_along_axis(ranked, (keep - 1)[:, None], axis=-1)  # [B, 1]
  return jnp.where(x >= threshold, x, -jnp.inf)


def gumbel_max(x: jax.Array, seed: jax.Array, step: jax.Array) -> jax.Array:
  """A draw from softmax(x) [B, V] by the Gumbel-max trick, noise hashed from (seed, step)."""
  gumbel = -jnp.log(-jnp.log(uniform_noise(seed, step, x.shape[-1])))
  return jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)


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
  greedy = jnp.argmax(logits, axis=-1)
  drawn = gumbel_max(filter_logits(logits, temperature, top_k, top_p), seed, step)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def token_logprobs(
    logits: jax.Array,  # [B, V] float
    tokens: jax.Array,  # [B] int32, the sampled tokens
    k: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """-> chosen [B] float32, top ids [B, k] int32, top logprobs [B, k] float32 (best first)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]
  top_values, top_ids = jax.lax.top_k(logp, min(k, logp.shape[-1]))
  return chosen, top_ids.astype(jnp.int32), top_values
