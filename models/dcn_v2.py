"""DCN-v2 click-through-rate model (Wang et al. 2021): cross network, then deep network.

Inputs `dense` [B, 13] float32 and `sparse` [B, 26] int ids (looked up with
`models.embedding.lookup_embeddings`, shared with DLRM: ids modulo each table's size, -1
gives a zero vector); output `prob` [B, 1]. The cross network computes
x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, with W_l full rank or low rank (U_l V_l).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.embedding import CategoricalEmbeddings, make_tables
from models.layers import MLP, Dense

# Same id spaces as the DLRM demo, narrower embeddings.
DEMO_TABLE_SIZES: tuple[int, ...] = (
    1_000_000, 500_000, 200_000, 100_000, 100_000, 50_000, 50_000, 20_000,
) + (10_000,) * 18


@dataclasses.dataclass(frozen=True, slots=True)
class DCNv2Config:
  """Shape of a DCN-v2 model; every field changes the compiled code."""

  num_dense: int = 13
  table_sizes: tuple[int, ...] = DEMO_TABLE_SIZES
  embed_dim: int = 16
  cross_layers: int = 3
  cross_rank: int | None = 64  # None: full-rank cross weights
  deep_mlp: tuple[int, ...] = (256, 128, 64)
  embedding_impl: str = "auto"

  def __post_init__(self):
    if not self.table_sizes or min(self.table_sizes) < 1:
      raise ValueError(f"table_sizes must be positive, got {self.table_sizes}")
    if self.cross_layers < 0:
      raise ValueError(f"cross_layers={self.cross_layers} must be >= 0")
    if self.cross_rank is not None and self.cross_rank < 1:
      raise ValueError(f"cross_rank={self.cross_rank} must be >= 1 or None")
    if not self.deep_mlp or min(self.deep_mlp) < 1:
      raise ValueError(f"deep_mlp must be non-empty and positive, got {self.deep_mlp}")

  @property
  def num_sparse(self) -> int:
    return len(self.table_sizes)

  @property
  def input_dim(self) -> int:
    return self.num_dense + self.num_sparse * self.embed_dim

  @classmethod
  def demo(cls) -> DCNv2Config:
    """The demo model: DLRM's 26 id spaces at 16-d (~130 MB of tables), rank-64 cross layers."""
    return cls()

  @classmethod
  def tiny(cls) -> DCNv2Config:
    """A small model for tests: same structure, kilobytes of weights."""
    return cls(table_sizes=(1000, 500, 97, 50) + (10,) * 22, embed_dim=4, cross_layers=2,
               cross_rank=None, deep_mlp=(32, 16))


class CrossLayer(nnx.Module):
  """x0 * (W x + b) + x, with W = U V when `rank` is given."""

  def __init__(self, dim: int, rank: int | None, *, rngs: nnx.Rngs):
    if rank is None:
      self.w = Dense(dim, dim, rngs=rngs, axes=("embed", "cross"))
      self.u = self.v = None
    else:
      self.w = None
      self.u = Dense(dim, rank, rngs=rngs, axes=("embed", "cross"), use_bias=False)
      self.v = Dense(rank, dim, rngs=rngs, axes=("cross", "embed"))

  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:  # [B, d], [B, d] -> [B, d]
    wx = self.w(x) if self.w is not None else self.v(self.u(x))
    return x0 * wx + x


class DCNv2(CategoricalEmbeddings, nnx.Module):
  """Embeddings + dense features -> cross network -> deep network -> logit (stacked DCN-v2)."""

  def __init__(self, config: DCNv2Config, *, rngs: nnx.Rngs):
    self.config = config
    self.tables = make_tables(config.table_sizes, config.embed_dim, rngs)
    d = config.input_dim
    self.cross = nnx.List([CrossLayer(d, config.cross_rank, rngs=rngs)
                           for _ in range(config.cross_layers)])
    self.deep = MLP(d, config.deep_mlp, rngs=rngs, final_activation=True)
    self.head = Dense(config.deep_mlp[-1], 1, rngs=rngs, axes=("embed", None))

  def __call__(self, dense: jax.Array, sparse: jax.Array) -> dict[str, jax.Array]:
    # dense: [B, num_dense] float; sparse: [B, num_sparse] int32/int64
    return self.from_embeddings(self.embed(sparse), dense)

  def from_embeddings(self, embeddings: jax.Array, dense: jax.Array) -> dict[str, jax.Array]:
    """`__call__` after the lookup: embeddings [B, F, D] float32, dense [B, num_dense]."""
    emb = embeddings  # [B, F, D]
    flat = emb.reshape(emb.shape[0], self.config.num_sparse * self.config.embed_dim)
    x0 = jnp.concatenate([dense.astype(jnp.float32), flat], axis=1)  # [B, d]
    x = x0
    for layer in self.cross:
      x = layer(x0, x)
    logit = self.head(self.deep(x))  # [B, 1]
    return {"prob": jax.nn.sigmoid(logit)}
