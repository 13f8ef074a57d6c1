"""PyTorch ads models for the torch export path (tests, docs, benchmarks/torch_models.py).

A DLRM-style model (padded-id embedding bags, bottom/top MLPs, dot interaction), a DCN-v2
(per-feature embeddings, full-rank cross layers beside a deep MLP) and a small transformer
encoder scorer over padded token ids. Written as a PyTorch user would; random-initialised.
Needs torch (a test-only dependency): nothing in serving or the demo repository imports it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True, slots=True)
class TorchCtrConfig:
  """Sizes of the CTR models: dense features, sparse features (one table each), bag length."""

  num_dense: int = 13
  table_rows: tuple[int, ...] = (1000, 500, 97, 50)
  embed_dim: int = 16
  bag: int = 4
  hidden: int = 64

  @classmethod
  def tiny(cls) -> "TorchCtrConfig":
    return cls(num_dense=5, table_rows=(100, 37, 50), embed_dim=8, bag=3, hidden=16)


def _mlp(sizes: list[int], last_relu: bool) -> nn.Sequential:
  layers: list[nn.Module] = []
  for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
    layers.append(nn.Linear(a, b))
    if last_relu or i < len(sizes) - 2:
      layers.append(nn.ReLU())
  return nn.Sequential(*layers)


class TorchDLRM(nn.Module):
  """dense [B, num_dense] float32, sparse [B, F, bag] int64 (0 pads a bag) -> prob [B, 1].

  Embedding bags alternate sum and mean pooling; interaction is the pairwise dot products of
  the bottom MLP's output and the pooled embeddings (lower triangle), then the top MLP.
  """

  def __init__(self, cfg: TorchCtrConfig):
    super().__init__()
    d, n = cfg.embed_dim, len(cfg.table_rows) + 1
    self.bags = nn.ModuleList(
        nn.EmbeddingBag(rows, d, mode="sum" if f % 2 == 0 else "mean", padding_idx=0)
        for f, rows in enumerate(cfg.table_rows))
    self.bottom = _mlp([cfg.num_dense, cfg.hidden, d], last_relu=True)
    self.top = _mlp([d + n * (n - 1) // 2, cfg.hidden, 1], last_relu=False)
    li, lj = torch.tril_indices(n, n, offset=-1)
    self.register_buffer("li", li, persistent=False)
    self.register_buffer("lj", lj, persistent=False)

  def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    x = self.bottom(dense)  # [B, D]
    pooled = [bag(sparse[:, f]) for f, bag in enumerate(self.bags)]  # F x [B, D]
    t = torch.stack([x, *pooled], dim=1)  # [B, F + 1, D]
    z = torch.bmm(t, t.transpose(1, 2))  # [B, F + 1, F + 1]
    return torch.sigmoid(self.top(torch.cat([x, z[:, self.li, self.lj]], dim=1)))


class TorchDCNv2(nn.Module):
  """dense [B, num_dense] float32, sparse [B, F] int64 -> prob [B, 1].

  x0 = [dense, embeddings]; cross layers x_{l+1} = x0 * (W x_l + b) + x_l (full rank), stacked
  with a deep MLP on x0, then a linear head.
  """

  def __init__(self, cfg: TorchCtrConfig, num_cross: int = 2):
    super().__init__()
    self.embeddings = nn.ModuleList(nn.Embedding(rows, cfg.embed_dim) for rows in cfg.table_rows)
    width = cfg.num_dense + cfg.embed_dim * len(cfg.table_rows)
    self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(num_cross))
    self.deep = _mlp([width, cfg.hidden, cfg.hidden], last_relu=True)
    self.head = nn.Linear(width + cfg.hidden, 1)

  def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    embs = [emb(sparse[:, f]) for f, emb in enumerate(self.embeddings)]
    x0 = torch.cat([dense, *embs], dim=1)  # [B, width]
    x = x0
    for layer in self.cross:
      x = x0 * layer(x) + x
    return torch.sigmoid(self.head(torch.cat([x, self.deep(x0)], dim=1)))


class TorchEncoderScorer(nn.Module):
  """token_ids [B, S] int64 (right-padded, S <= seq), lengths [B] int64 -> score [B, 1].

  Token + position embeddings, a pre-built `nn.TransformerEncoder` with a key padding mask,
  the mean of the valid positions, a linear head and a sigmoid.
  """

  def __init__(self, vocab: int = 200, seq: int = 16, dim: int = 32, heads: int = 4,
               layers: int = 2):
    super().__init__()
    self.tokens = nn.Embedding(vocab, dim)
    self.positions = nn.Parameter(torch.randn(seq, dim) * 0.02)
    layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
    self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    self.head = nn.Linear(dim, 1)

  def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    pad = torch.arange(token_ids.shape[1])[None, :] >= lengths[:, None]  # [B, S]
    positions = self.positions[: token_ids.shape[1]][None]  # any length up to `seq`
    h = self.encoder(self.tokens(token_ids) + positions, src_key_padding_mask=pad)
    valid = (~pad).to(h.dtype)[..., None]  # [B, S, 1]
    pooled = (h * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
    return torch.sigmoid(self.head(pooled))


def ctr_inputs(cfg: TorchCtrConfig, n: int, *, bags: bool, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
  """Random (dense, sparse) for n rows: sparse [n, F, bag] with 0-padded bags, or [n, F]."""
  g = torch.Generator().manual_seed(seed)
  dense = torch.randn(n, cfg.num_dense, generator=g)
  cols = [torch.randint(0, rows, (n, cfg.bag) if bags else (n,), generator=g)
          for rows in cfg.table_rows]
  return dense, torch.stack(cols, dim=1)


def token_inputs(n: int, *, vocab: int = 200, seq: int = 16, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
  """Random (token_ids [n, seq] zero-padded past each length, lengths [n] in 1..seq)."""
  g = torch.Generator().manual_seed(seed)
  lengths = torch.randint(1, seq + 1, (n,), generator=g)
  ids = torch.randint(1, vocab, (n, seq), generator=g)
  return ids * (torch.arange(seq)[None, :] < lengths[:, None]), lengths
