"""DLRM-style click-through-rate model: bottom MLP, embedding tables, dot interaction, top MLP.

Inputs `dense` [B, 13] float32 and `sparse` [B, 26] int ids (taken modulo each table's
size, the hashing trick; -1 means missing and contributes a zero vector); output
`prob` [B, 1], the predicted click probability. Lookups go through
`pallas_kernels.embedding_bag_multi` for float tables and for the row-wise 8-bit tables
that `export.quantize` ("int8_tables") puts in their place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.embedding import CategoricalEmbeddings, make_tables
from models.layers import MLP

# A realistic ads mix: a few huge id spaces dominate memory, most are small.
DEMO_TABLE_SIZES: tuple[int, ...] = (
    1_000_000, 500_000, 200_000, 100_000, 100_000, 50_000, 50_000, 20_000,
) + (10_000,) * 18


@dataclasses.dataclass(frozen=True, slots=True)
class DLRMConfig:
  """Shape of a DLRM model; every field changes the compiled code."""

  num_dense: int = 13
  table_sizes: tuple[int, ...] = DEMO_TABLE_SIZES
  embed_dim: int = 64
  bottom_mlp: tuple[int, ...] = (256, 128, 64)
  top_mlp: tuple[int, ...] = (512, 256, 1)
  embedding_impl: str = "auto"

  def __post_init__(self):
    if self.bottom_mlp[-1] != self.embed_dim:
      raise ValueError(
          f"bottom_mlp must end in embed_dim={self.embed_dim} (the interaction"
          f" dots it with the embeddings), got {self.bottom_mlp}"
      )
    if self.top_mlp[-1] != 1:
      raise ValueError(f"top_mlp must end in 1 (one logit), got {self.top_mlp}")
    if not self.table_sizes or min(self.table_sizes) < 1:
      raise ValueError(f"table_sizes must be positive, got {self.table_sizes}")

  @property
  def num_sparse(self) -> int:
    return len(self.table_sizes)

  @property
  def num_interactions(self) -> int:
    n = self.num_sparse + 1
    return n * (n - 1) // 2

  @classmethod
  def demo(cls) -> DLRMConfig:
    """The built-in demo model `xlaserve serve` starts with (about 0.5 GB of tables)."""
    return cls()

  @classmethod
  def tiny(cls) -> DLRMConfig:
    """A small model for tests: same structure, kilobytes of weights."""
    return cls(
        table_sizes=(1000, 500, 97, 50) + (10,) * 22,
        embed_dim=8,
        bottom_mlp=(32, 8),
        top_mlp=(32, 16, 1),
    )

  @classmethod
  def light(cls) -> DLRMConfig:
    """A light CTR model (8 categorical features, small MLPs): a batch of 256 rows takes
    about 0.1 ms on 2 CPU cores, the regime where the server's host path, not the model,
    sets the ceiling (what an accelerator makes of a full-size model)."""
    return cls(
        num_dense=13,
        table_sizes=(100_000, 20_000, 5_000, 1_000, 500, 100, 100, 50),
        embed_dim=8,
        bottom_mlp=(32, 8),
        top_mlp=(32, 1),
    )


class DLRM(CategoricalEmbeddings, nnx.Module):
  """DLRM (Naumov et al. 2019) with one id per categorical feature."""

  def __init__(self, config: DLRMConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.bottom = MLP(config.num_dense, config.bottom_mlp, rngs=rngs, final_activation=True)
    self.tables = make_tables(config.table_sizes, config.embed_dim, rngs)
    self.top = MLP(config.embed_dim + config.num_interactions, config.top_mlp, rngs=rngs)

  def logits(self, dense: jax.Array, sparse: jax.Array) -> jax.Array:
    """The click logit [B, 1] (serving gets its sigmoid)."""
    # dense: [B, num_dense] float; sparse: [B, num_sparse] int32/int64
    return self.logits_from_embeddings(dense, self.embed(sparse))

  def logits_from_embeddings(self, dense: jax.Array, emb: jax.Array) -> jax.Array:
    """Bottom MLP, dot interaction and top MLP on looked-up embeddings emb [B, F, D] -> [B, 1].

    Training calls this with only the batch's rows gathered (models/train.py).
    """
    x = self.bottom(dense.astype(jnp.float32))  # [B, D]
    feats = jnp.concatenate([x[:, None, :], emb.astype(jnp.float32)], axis=1)  # [B, F+1, D]
    dots = jnp.einsum("bid,bjd->bij", feats, feats)  # [B, F+1, F+1]
    i, j = np.tril_indices(feats.shape[1], k=-1)
    inter = dots[:, i, j]  # [B, (F+1)F/2]
    return self.top(jnp.concatenate([x, inter], axis=1))  # [B, 1]

  def from_embeddings(self, embeddings: jax.Array, dense: jax.Array) -> dict[str, jax.Array]:
    """`__call__` after the lookup: embeddings [B, F, D] float32, dense [B, num_dense]."""
    return {"prob": jax.nn.sigmoid(self.logits_from_embeddings(dense, embeddings))}

  def __call__(self, dense: jax.Array, sparse: jax.Array) -> dict[str, jax.Array]:
    return self.from_embeddings(self.embed(sparse), dense)
