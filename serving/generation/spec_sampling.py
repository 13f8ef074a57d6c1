"""Speculative verification on the device: which draft tokens the target accepts, and the next.

The verify pass feeds each row `[last token, d_1, .., d_n]` and gets the target's logits at
every position: position j scores the token after d_j (d_0 being the last committed token).
With a deterministic draft (n-gram lookup: q is one-hot on d) the standard rejection rule
(Leviathan et al. 2023; vLLM's `rejection_sampler.py`) reads: accept d_{j+1} with probability
p_j(d_{j+1}); at the first rejection draw from p_j with d_{j+1}'s mass removed, renormalized;
if all n are accepted draw a bonus token from p_n. Each emitted token is then distributed
exactly as the target's (p after temperature, top_k and top_p, as `sample_tokens` applies
them). A greedy row accepts while d equals the argmax and then emits the argmax: token for
token what plain greedy decoding gives.

Randomness is hashed from (seed, step + j), like `sample_tokens`, with separate streams for the
acceptance tests and the final draw, so a seeded request stays reproducible in any batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from serving.generation.sampling import filter_logits, gumbel_max, uniform_noise

_ACCEPT_SALT = 0x2545F491  # a second noise stream for the acceptance tests


def verify_tokens(
    logits: jax.Array,  # [B, C, V] float, the target's at every fed position
    tokens: jax.Array,  # [B, C] int32, [last, d_1 .. d_{C-1}] (padding past lengths)
    lengths: jax.Array,  # [B] int32, 1 + number of draft tokens (0: idle row)
    *,
    temperature: jax.Array,  # [B] float32, 0 = greedy
    top_k: jax.Array,  # [B] int32
    top_p: jax.Array,  # [B] float32
    seed: jax.Array,  # [B] int32
    step: jax.Array,  # [B] int32, index of the first token this call emits
) -> tuple[jax.Array, jax.Array]:
  """-> (emitted [B, C] int32: accepted drafts then the final token, padded with the final;
  counts [B] int32: tokens emitted per row, 1..lengths)."""
  b, c, v = logits.shape
  rep = lambda a: jnp.repeat(a, c)  # noqa: E731  [B] -> [B * C], row-major like the logits
  x = filter_logits(logits.reshape(b * c, v), rep(temperature), rep(top_k), rep(top_p))
  probs = jax.nn.softmax(x, axis=-1).reshape(b, c, v)
  x = x.reshape(b, c, v)
  draft = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # [B, C]: d_{j+1} at j
  j = jnp.arange(c, dtype=jnp.int32)[None, :]  # [1, C]
  n = jnp.maximum(lengths - 1, 0)[:, None]  # [B, 1], draft tokens per row
  sampled = (temperature > 0)[:, None]
  p_draft = jnp.take_along_axis(probs, draft[..., None], axis=-1)[..., 0]  # [B, C]
  u = uniform_noise(jnp.repeat(seed ^ _ACCEPT_SALT, c),
                    (step[:, None] + j).reshape(-1), 1).reshape(b, c)
  greedy_ok = draft == jnp.argmax(logits, axis=-1)
  ok = jnp.where(sampled, u < p_draft, greedy_ok) & (j < n)
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
  at = accepted[:, None, None]
  x_a = jnp.take_along_axis(x, at, axis=1)[:, 0]  # [B, V], logits at the stop position
  d_a = jnp.take_along_axis(draft, accepted[:, None], axis=1)[:, 0]  # [B]
  rejected = (accepted < n[:, 0])[:, None] & (jnp.arange(v)[None, :] == d_a[:, None])
  drawn = gumbel_max(jnp.where(rejected, -jnp.inf, x_a), seed, step + accepted)
  raw_a = jnp.take_along_axis(logits, at, axis=1)[:, 0]
  final = jnp.where(sampled[:, 0], drawn, jnp.argmax(raw_a, axis=-1)).astype(jnp.int32)
  emitted = jnp.where(j < accepted[:, None], draft, final[:, None]).astype(jnp.int32)
  return emitted, accepted + 1
