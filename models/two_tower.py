"""Two-tower retrieval model: a query tower and an ad tower map token ids to unit vectors.

Each tower is a small transformer encoder, mean-pooled over the valid tokens, projected and
L2-normalised, so the dot product of a query and an ad embedding is their cosine
similarity (what an ANN index over ad embeddings serves). The towers are separate entry
points, exported as the signatures `query_embedding` and `ad_embedding` of one bundle:
queries are embedded online, ads offline in bulk.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.encoder import Encoder, EncoderConfig, cast_params, valid_mask
from models.layers import Dense

_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True, slots=True)
class TwoTowerConfig:
  """One encoder config per tower and the shared output dimension."""

  query: EncoderConfig = EncoderConfig(num_layers=1, max_len=64)
  ad: EncoderConfig = EncoderConfig(num_layers=2, max_len=256)
  embed_dim: int = 64

  def __post_init__(self):
    if self.embed_dim < 1:
      raise ValueError(f"embed_dim={self.embed_dim} must be >= 1")
    for name in ("query", "ad"):
      if getattr(self, name).num_segments:
        raise ValueError(f"the {name} tower reads one text: num_segments must be 0")

  @classmethod
  def demo(cls) -> TwoTowerConfig:
    """The demo model: 1-layer query tower (max 64 tokens), 2-layer ad tower, 64-d embeddings."""
    return cls()

  @classmethod
  def tiny(cls) -> TwoTowerConfig:
    """A small model for tests: 1-layer towers, d_model 32, 16-d embeddings."""
    small = EncoderConfig(vocab_size=512, max_len=128, d_model=32, num_heads=2, head_dim=16,
                          mlp_dim=64, num_layers=1)
    return cls(query=small, ad=small, embed_dim=16)


class Tower(nnx.Module):
  """Encoder -> mean over valid tokens -> projection -> unit vector."""

  def __init__(self, config: EncoderConfig, embed_dim: int, *, rngs: nnx.Rngs):
    self.encoder = Encoder(config, rngs=rngs)
    self.proj = Dense(config.d_model, embed_dim, rngs=rngs, axes=("embed", "mlp"))
    if config.dtype != "float32":
      cast_params(self, config.dtype)

  def __call__(self, token_ids: jax.Array, lengths: jax.Array) -> jax.Array:
    # token_ids: [B, S] int32; lengths: [B] int32 -> [B, E] float32, unit norm (zero if length 0)
    h = self.encoder(token_ids, lengths).astype(jnp.float32)  # [B, S, D]
    seq = token_ids.shape[1]
    mask = valid_mask(jnp.clip(lengths, 0, seq), seq)  # [B, S]
    count = jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1).astype(jnp.float32)
    pooled = jnp.sum(jnp.where(mask[..., None], h, 0.0), axis=1) / count  # [B, D]
    e = self.proj(pooled.astype(h.dtype)).astype(jnp.float32)  # [B, E]
    norm = jnp.sqrt(jnp.sum(e * e, axis=-1, keepdims=True))
    return e / jnp.maximum(norm, _NORM_EPS)


class TwoTower(nnx.Module):
  """Query and ad towers with separate weights; `__call__` scores pairs (training, tests)."""

  def __init__(self, config: TwoTowerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.query = Tower(config.query, config.embed_dim, rngs=rngs)
    self.ad = Tower(config.ad, config.embed_dim, rngs=rngs)

  def query_embedding(self, token_ids: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
    """Query tokens [B, S] + lengths [B] -> `embedding` [B, E]."""
    return {"embedding": self.query(token_ids, lengths)}

  def ad_embedding(self, token_ids: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
    """Ad tokens [B, S] + lengths [B] -> `embedding` [B, E]."""
    return {"embedding": self.ad(token_ids, lengths)}

  def __call__(self, query_ids: jax.Array, query_lengths: jax.Array, ad_ids: jax.Array,
               ad_lengths: jax.Array) -> dict[str, jax.Array]:
    q = self.query(query_ids, query_lengths)
    a = self.ad(ad_ids, ad_lengths)
    return {"score": jnp.sum(q * a, axis=-1, keepdims=True)}  # [B, 1] cosine similarity
