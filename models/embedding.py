"""Categorical-feature embedding lookups shared by the CTR models (DLRM, DCN-v2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lookup_embeddings(
    tables: list[jax.Array], ids: jax.Array, impl: str = "auto"
) -> jax.Array:
  """One id per feature -> [B, F, D]; ids taken modulo rows, -1 gives zeros."""
  outs = []
  for f, table in enumerate(tables):
    col = ids[:, f].astype(jnp.int32)
    valid = col >= 0
    row = jnp.where(valid, col % table.shape[0], 0)
    vec = jnp.take(table, row, axis=0).astype(jnp.float32)
    outs.append(jnp.where(valid[:, None], vec, 0.0))
  return jnp.stack(outs, axis=1)
