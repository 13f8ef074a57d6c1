"""Ads ranking with a user side: one user (pooled click history + profile) against many ads.

The user tower (a mean-pooled bag of the user's last `history_len` clicked ad ids and an MLP
over it, the user's dense profile and optionally the query's embedding) depends on the request
only; the ad tower (categorical ad
features and ad dense features) and the head (user, ad and their product) depend on each
candidate. `context` and `score` are that split, which `export.export_context_model` serves
once per request and once per candidate; `__call__` is the same model flat (user rows given on
every candidate row).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.embedding import lookup_embeddings, make_tables
from models.layers import MLP, Dense, kernel_impl
from pallas_kernels import embedding_bag


@dataclasses.dataclass(frozen=True, slots=True)
class RankerConfig:
  """Shape of the ranking model; every field changes the compiled code."""

  history_rows: int = 200_000  # ad id space of the click history
  history_len: int = 100  # ids per user (-1 pads a short history)
  history_dim: int = 16  # = ad_dim: one embedding width (table-wise sharding fuses tables)
  user_dense: int = 16
  query_dim: int = 0  # > 0: the context also takes a query embedding [R, query_dim]
  user_mlp: tuple[int, ...] = (512, 256, 64)
  ad_table_sizes: tuple[int, ...] = (500_000, 50_000, 1_000, 50)  # ad, advertiser, category, type
  ad_dim: int = 16
  ad_dense: int = 8
  ad_mlp: tuple[int, ...] = (128, 64)
  head_mlp: tuple[int, ...] = (128, 64, 1)
  embedding_impl: str = "auto"

  def __post_init__(self):
    if self.user_mlp[-1] != self.ad_mlp[-1]:
      raise ValueError(f"user_mlp and ad_mlp must end in the same width (the head takes their"
                       f" product), got {self.user_mlp} and {self.ad_mlp}")
    if len(self.head_mlp) < 2 or self.head_mlp[-1] != 1:
      raise ValueError(f"head_mlp must have a hidden layer and end in 1 (one logit), got"
                       f" {self.head_mlp}")

  @classmethod
  def demo(cls) -> RankerConfig:
    """The demo `ranker` (search ads: the context is the user and the query's 64-d two-tower
    embedding): the user side is about four fifths of a flat row's work."""
    return cls(query_dim=64)

  @classmethod
  def tiny(cls) -> RankerConfig:
    """Same structure, kilobytes of weights: for tests."""
    return cls(history_rows=500, history_len=6, history_dim=4, user_dense=3, user_mlp=(16, 8),
               ad_table_sizes=(300, 40, 7), ad_dim=4, ad_dense=2, ad_mlp=(12, 8),
               head_mlp=(8, 1))

  @property
  def width(self) -> int:
    return self.user_mlp[-1]


class Ranker(nnx.Module):
  """User tower once per user, ad tower per candidate, head on (user, ad, user * ad) with the
  user's part of its first layer computed with the user tower."""

  def __init__(self, config: RankerConfig, *, rngs: nnx.Rngs):
    self.config = config
    c = config
    self.history = nnx.Param(
        jax.random.normal(rngs.params(), (c.history_rows, c.history_dim)) / c.history_dim ** 0.5,
        logical_axes=("table_rows", "embed"))
    self.user_mlp = MLP(c.history_dim + c.user_dense + c.query_dim, c.user_mlp, rngs=rngs)
    self.ad_tables = make_tables(c.ad_table_sizes, c.ad_dim, rngs)
    self.ad_mlp = MLP(len(c.ad_table_sizes) * c.ad_dim + c.ad_dense, c.ad_mlp, rngs=rngs)
    # The head's first layer on (user, ad, user * ad), split by part: the user's part is
    # computed once per request in `context`, the others per candidate (the same sum).
    hidden = c.head_mlp[0]
    self.head_user = Dense(c.width, hidden, rngs=rngs)
    self.head_ad = Dense(c.width, hidden, rngs=rngs, use_bias=False)
    self.head_cross = Dense(c.width, hidden, rngs=rngs, use_bias=False)
    self.head = MLP(hidden, c.head_mlp[1:], rngs=rngs)

  def context(self, history: jax.Array, user_dense: jax.Array,
              query: jax.Array | None = None) -> dict[str, jax.Array]:
    """history [R, history_len] ids, user_dense [R, user_dense] (and with `query_dim`, the
    query's embedding [R, query_dim]) -> {"user": [R, width], "user_head": [R, head_mlp[0]]}
    (the user's share of the head's first layer)."""
    pooled = embedding_bag(self.history[...], history.astype(jnp.int32), combiner="mean",
                           impl=kernel_impl(self.config.embedding_impl, history))
    parts = [pooled.astype(jnp.float32), user_dense.astype(jnp.float32)]
    if self.config.query_dim:
      if query is None:
        raise ValueError(f"this ranker takes a query embedding [R, {self.config.query_dim}]")
      parts.append(query.astype(jnp.float32))
    user = jax.nn.relu(self.user_mlp(jnp.concatenate(parts, axis=1)))
    return {"user": user, "user_head": self.head_user(user)}

  def score(self, context: dict[str, jax.Array], ad_sparse: jax.Array,
            ad_dense: jax.Array) -> dict[str, jax.Array]:
    """context {"user", "user_head"} (each candidate's user rows), ad_sparse [C, F] ids,
    ad_dense [C, ad_dense] -> {"prob": [C, 1]} click probability."""
    tables = [self.ad_tables[f"t{f:02d}"][...] for f in range(len(self.config.ad_table_sizes))]
    emb = lookup_embeddings(tables, ad_sparse, self.config.embedding_impl)  # [C, F, D]
    ad_in = jnp.concatenate([emb.reshape(emb.shape[0], -1), ad_dense.astype(jnp.float32)], 1)
    ad = jax.nn.relu(self.ad_mlp(ad_in))
    user = context["user"]
    hidden = context["user_head"] + self.head_ad(ad) + self.head_cross(user * ad)
    return {"prob": jax.nn.sigmoid(self.head(jax.nn.relu(hidden)))}

  def __call__(self, history: jax.Array, user_dense: jax.Array, ad_sparse: jax.Array,
               ad_dense: jax.Array, query: jax.Array | None = None) -> dict[str, jax.Array]:
    """The flat model: every row carries its user's (and query's) inputs."""
    return self.score(self.context(history, user_dense, query), ad_sparse, ad_dense)
