"""BERT-style query-ad relevance cross-encoder.

Inputs (one row per query-ad pair, right-padded): `token_ids` [B, S] int32 (query tokens,
then ad tokens), `segment_ids` [B, S] int32 (0 query, 1 ad), `lengths` [B] int32 (valid
tokens per row). Output `score` [B, 1] float32: the relevance probability, read from the
first token's final state. Padded positions never influence a row's score.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.encoder import EncoderConfig, Encoder, cast_params
from models.layers import Dense


@dataclasses.dataclass(frozen=True, slots=True)
class RelevanceConfig:
  """The cross-encoder: an encoder with two segments and a pooled scoring head."""

  encoder: EncoderConfig = EncoderConfig(num_segments=2)

  def __post_init__(self):
    if self.encoder.num_segments != 2:
      raise ValueError(f"a cross-encoder needs num_segments=2 (query, ad), got"
                       f" {self.encoder.num_segments}")

  @property
  def max_len(self) -> int:
    return self.encoder.max_len

  @classmethod
  def demo(cls) -> RelevanceConfig:
    """The demo model: 2 layers, d_model 128, 4 heads, 8192-token vocabulary (~1.5M params)."""
    return cls()

  @classmethod
  def tiny(cls) -> RelevanceConfig:
    """A small model for tests: 1 layer, d_model 32, 2 heads, max 128 tokens."""
    return cls(EncoderConfig(vocab_size=512, max_len=128, d_model=32, num_heads=2, head_dim=16,
                             mlp_dim=64, num_layers=1, num_segments=2))

  def with_dtype(self, dtype: str) -> RelevanceConfig:
    return dataclasses.replace(self, encoder=dataclasses.replace(self.encoder, dtype=dtype))


class RelevanceModel(nnx.Module):
  """Cross-encoder: encoder over the pair, tanh pooler on the first token, one logit."""

  def __init__(self, config: RelevanceConfig, *, rngs: nnx.Rngs):
    self.config = config
    d = config.encoder.d_model
    self.encoder = Encoder(config.encoder, rngs=rngs)
    self.pooler = Dense(d, d, rngs=rngs, axes=("embed", "mlp"))
    self.head = Dense(d, 1, rngs=rngs, axes=("mlp", None))
    if config.encoder.dtype != "float32":
      cast_params(self, config.encoder.dtype)

  def __call__(self, token_ids: jax.Array, segment_ids: jax.Array,
               lengths: jax.Array) -> dict[str, jax.Array]:
    # token_ids, segment_ids: [B, S] int32; lengths: [B] int32 -> score [B, 1] float32
    h = self.encoder(token_ids, lengths, segment_ids)  # [B, S, D]
    pooled = jnp.tanh(self.pooler(h[:, 0]))  # [B, D]
    logit = self.head(pooled).astype(jnp.float32)  # [B, 1]
    return {"score": jax.nn.sigmoid(logit)}
