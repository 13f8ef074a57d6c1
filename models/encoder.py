"""Bidirectional transformer encoder shared by the relevance cross-encoder and the two-tower model.

Right-padded batches: `lengths[b]` is the valid length of row `b`. Attention goes through
`pallas_kernels.flash_attention` (impl "auto": the Triton kernel on CUDA, the jnp reference
elsewhere), which gives padded keys no weight, so a row's valid outputs do not depend on how
far it was padded; that is what lets a server pad sequences to length buckets.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import Dense
from pallas_kernels.dispatch import check_impl
from pallas_kernels.flash_attention import flash_attention

DTYPES: tuple[str, ...] = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, slots=True)
class EncoderConfig:
  """Shape of a BERT-style encoder; every field changes the compiled code."""

  vocab_size: int = 8192
  max_len: int = 256
  d_model: int = 128
  num_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 512
  num_layers: int = 2
  num_segments: int = 0  # 0: no segment embeddings (a single text)
  norm_eps: float = 1e-6
  dtype: str = "float32"  # params and activations (models cast after building); norms and
  #                         softmax run in float32
  attention_impl: str = "auto"

  def __post_init__(self):
    for f in ("vocab_size", "max_len", "d_model", "num_heads", "head_dim", "mlp_dim",
              "num_layers"):
      if getattr(self, f) < 1:
        raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
    if self.num_segments < 0:
      raise ValueError(f"num_segments={self.num_segments} must be >= 0")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
    check_impl(self.attention_impl)

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)


def _param(x: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(x.astype(jnp.float32), logical_axes=axes)


def cast_params(module: nnx.Module, dtype: str | jnp.dtype) -> None:
  """Rounds every floating parameter of `module` to `dtype` in place.

  Models are built in float32 and then cast, so a bfloat16 model holds exactly the float32
  model's weights, rounded (sampling straight in bfloat16 would draw different weights).
  """
  dtype = jnp.dtype(dtype)
  state = nnx.state(module, nnx.Param)
  nnx.update(module, jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state))


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias, computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, *, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class EncoderLayer(nnx.Module):
  """Pre-norm block: multi-head self-attention over valid keys, then a GELU MLP."""

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.impl = c.attention_impl
    s = 1.0 / math.sqrt(c.d_model)
    shape = (c.d_model, c.num_heads, c.head_dim)
    self.attn_norm = LayerNorm(c.d_model, eps=c.norm_eps)
    self.wq = _param(s * jax.random.normal(rngs.params(), shape), ("embed", "heads", "head_dim"))
    self.wk = _param(s * jax.random.normal(rngs.params(), shape), ("embed", "heads", "head_dim"))
    self.wv = _param(s * jax.random.normal(rngs.params(), shape), ("embed", "heads", "head_dim"))
    o = 1.0 / math.sqrt(c.num_heads * c.head_dim * 2 * c.num_layers)
    self.wo = _param(o * jax.random.normal(rngs.params(), (c.num_heads, c.head_dim, c.d_model)),
                     ("heads", "head_dim", "embed"))
    self.mlp_norm = LayerNorm(c.d_model, eps=c.norm_eps)
    self.up = Dense(c.d_model, c.mlp_dim, rngs=rngs, axes=("embed", "mlp"))
    self.down = Dense(c.mlp_dim, c.d_model, rngs=rngs, axes=("mlp", "embed"))

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    # x: [B, S, D]; lengths: [B] int32 in [0, S]
    h = self.attn_norm(x)
    q = jnp.einsum("BSD,DNH->BNSH", h, self.wq[...])
    k = jnp.einsum("BSD,DNH->BNSH", h, self.wk[...])
    v = jnp.einsum("BSD,DNH->BNSH", h, self.wv[...])
    o = flash_attention(q, k, v, lengths=lengths, impl=self.impl)  # [B, N, S, H]
    x = x + jnp.einsum("BNSH,NHD->BSD", o, self.wo[...])
    return x + self.down(jax.nn.gelu(self.up(self.mlp_norm(x))))


class Encoder(nnx.Module):
  """Token (+ position, + segment) embeddings -> layers -> final norm: [B, S] ids -> [B, S, D].

  Token ids are taken modulo `vocab_size` (the hashing trick; negative ids wrap too);
  `lengths` are clipped to [0, S]. S must not exceed `max_len`.
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = config
    s = 1.0 / math.sqrt(c.d_model)
    self.tokens = _param(s * jax.random.normal(rngs.params(), (c.vocab_size, c.d_model)),
                         ("vocab", "embed"))
    self.positions = _param(s * jax.random.normal(rngs.params(), (c.max_len, c.d_model)),
                            (None, "embed"))
    self.segments = (_param(s * jax.random.normal(rngs.params(), (c.num_segments, c.d_model)),
                            (None, "embed")) if c.num_segments else None)
    self.layers = nnx.List([EncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = LayerNorm(c.d_model, eps=c.norm_eps)

  def __call__(self, token_ids: jax.Array, lengths: jax.Array,
               segment_ids: jax.Array | None = None) -> jax.Array:
    # token_ids, segment_ids: [B, S] int; lengths: [B] int -> [B, S, D]
    c = self.config
    seq = token_ids.shape[1]
    if seq > c.max_len:
      raise ValueError(f"sequence length {seq} exceeds max_len={c.max_len}")
    ids = jnp.mod(token_ids.astype(jnp.int32), c.vocab_size)
    x = jnp.take(self.tokens[...], ids, axis=0) + self.positions[...][None, :seq]
    if self.segments is not None:
      if segment_ids is None:
        raise ValueError("this encoder has segment embeddings: pass segment_ids")
      seg = jnp.clip(segment_ids.astype(jnp.int32), 0, c.num_segments - 1)
      x = x + jnp.take(self.segments[...], seg, axis=0)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq)
    for layer in self.layers:
      x = layer(x, lengths)
    return self.final_norm(x)


def valid_mask(lengths: jax.Array, seq: int) -> jax.Array:
  """[B] lengths -> [B, S] bool, True at positions < length."""
  return jnp.arange(seq)[None, :] < lengths.astype(jnp.int32)[:, None]
