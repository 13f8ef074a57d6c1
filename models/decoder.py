"""Decoder-only transformer LM: RoPE, grouped-query attention, RMSNorm, SwiGLU MLP.

Three pure entry points over the same params:
  `__call__(tokens)`                 full-sequence logits, plain causal attention (the reference)
  `prefill(tokens, lengths, page_table, cache)`   writes the prompt's K/V into pages, returns
                                     the logits at each row's last valid position
  `decode_step(tokens, positions, page_table, lengths, cache)`   one token per row through
                                     `paged_attention`
  `extend(tokens, starts, lengths, page_table, cache)`   a prefill chunk at an offset that
                                     attends to the pages the sequence already has (chunked
                                     prefill, prefix caching; models/chunk_attention.py)
  `verify(tokens, starts, lengths, page_table, cache)`   `extend` with the logits at every
                                     chunk position (speculative decoding's one-pass check)

`cache` maps "k_pages", "v_pages" [layers, kv_heads, num_pages, page_size, head_dim] (float,
or int8 with "k_scale", "v_scale" [layers, kv_heads, num_pages, page_size] float32, one scale
per token per kv head). Page `NULL_PAGE` takes every write of a padded position or an idle
row, so a server must never hand it to a sequence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import Dense
from models.chunk_attention import paged_chunk_attention
from pallas_kernels.common import MASK_VALUE
from pallas_kernels.dispatch import check_impl
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention

NULL_PAGE = 0
KV_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8")
# Logical axes of the cache's pages [layers, kv_heads, num_pages, page_size, head_dim] (the int8
# scales drop head_dim): split by kv heads, each device holds its heads' pages.
CACHE_AXES: tuple[str | None, ...] = (None, "kv_heads", None, None, None)

Cache = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True, slots=True)
class DecoderConfig:
  """Shape of a decoder LM; every field changes the compiled code."""

  vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD (models/tokenizer.py)
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 8
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 768
  max_seq_len: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  attention_impl: str = "auto"

  def __post_init__(self):
    for f in ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_seq_len"):
      if getattr(self, f) < 1:
        raise ValueError(f"{f}={getattr(self, f)} must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of"
                       f" num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
    check_impl(self.attention_impl)

  @classmethod
  def demo(cls) -> DecoderConfig:
    """The demo LM: 4 layers, d_model 256, 8 query / 2 kv heads, byte vocabulary (~3.4M params)."""
    return cls()

  @classmethod
  def draft(cls) -> DecoderConfig:
    """A draft LM for the demo (speculative decoding): its sequence length, 1 layer, d 128."""
    return cls(num_layers=1, d_model=128, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)

  @classmethod
  def tiny(cls) -> DecoderConfig:
    """A small LM for tests: same structure, separate output head, ~0.1M params."""
    return cls(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192,
               max_seq_len=128, tie_embeddings=False)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates halves of the last axis by position; x [..., heads, head_dim], positions [...]."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # [..., 1, half]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain causal GQA attention: q [B, T, N, H], k/v [B, T, K, H] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, h).astype(jnp.float32)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) / math.sqrt(h)
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T, S]
  w = jax.nn.softmax(jnp.where(causal, s, MASK_VALUE), axis=-1)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", w, v.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST)
  return o.reshape(b, t, n, h).astype(q.dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Symmetric int8 per vector: x [..., H] -> (int8 [..., H], float32 scale [...])."""
  x = x.astype(jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(x), axis=-1) / 127.0, 1e-8)
  return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


def cache_shapes(config: DecoderConfig, *, num_pages: int, page_size: int,
                 kv_dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
  """Name -> (shape, dtype name) of every KV cache array the serving entry points take."""
  if kv_dtype not in KV_DTYPES:
    raise ValueError(f"kv_dtype={kv_dtype!r} must be one of {KV_DTYPES}")
  pages = (config.num_layers, config.num_kv_heads, num_pages, page_size, config.head_dim)
  shapes = {"k_pages": (pages, kv_dtype), "v_pages": (pages, kv_dtype)}
  if kv_dtype == "int8":
    shapes |= {"k_scale": (pages[:-1], "float32"), "v_scale": (pages[:-1], "float32")}
  return shapes


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, in float32."""

  def __init__(self, dim: int, *, eps: float):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
  """Q/K/V/O projections of grouped-query attention; the attention itself is passed in."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.theta = c.rope_theta
    d = 1.0 / math.sqrt(c.d_model)
    self.wq = nnx.Param(d * jax.random.normal(rngs.params(), (c.d_model, c.num_heads, c.head_dim)),
                        logical_axes=("embed", "heads", "head_dim"))
    kv_shape = (c.d_model, c.num_kv_heads, c.head_dim)
    self.wk = nnx.Param(d * jax.random.normal(rngs.params(), kv_shape),
                        logical_axes=("embed", "kv_heads", "head_dim"))
    self.wv = nnx.Param(d * jax.random.normal(rngs.params(), kv_shape),
                        logical_axes=("embed", "kv_heads", "head_dim"))
    o = 1.0 / math.sqrt(c.num_heads * c.head_dim * 2 * c.num_layers)
    self.wo = nnx.Param(o * jax.random.normal(rngs.params(), (c.num_heads, c.head_dim, c.d_model)),
                        logical_axes=("heads", "head_dim", "embed"))

  def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # x [..., D], positions [...] -> q [..., N, H], k/v [..., K, H]
    q = jnp.einsum("...D,DNH->...NH", x, self.wq[...])
    k = jnp.einsum("...D,DKH->...KH", x, self.wk[...])
    v = jnp.einsum("...D,DKH->...KH", x, self.wv[...])
    return rope(q, positions, self.theta), rope(k, positions, self.theta), v

  def out(self, o: jax.Array) -> jax.Array:  # [..., N, H] -> [..., D]
    return jnp.einsum("...NH,NHD->...D", o, self.wo[...])


class GatedMLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.gate = Dense(d_model, mlp_dim, rngs=rngs, axes=("embed", "mlp"), use_bias=False)
    self.up = Dense(d_model, mlp_dim, rngs=rngs, axes=("embed", "mlp"), use_bias=False)
    self.down = Dense(mlp_dim, d_model, rngs=rngs, axes=("mlp", "embed"), use_bias=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


# attend(layer, q [..., N, H], k [..., K, H], v [..., K, H]) -> [..., N, H]
Attend = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


class Block(nnx.Module):
  """Pre-norm residual block: attention then gated MLP."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
    self.mlp = GatedMLP(config.d_model, config.mlp_dim, rngs=rngs)

  def __call__(self, layer: int, x: jax.Array, positions: jax.Array, attend: Attend) -> jax.Array:
    q, k, v = self.attn.qkv(self.attn_norm(x), positions)
    x = x + self.attn.out(attend(layer, q, k, v))
    return x + self.mlp(self.mlp_norm(x))


class Decoder(nnx.Module):
  """The LM. Token ids in, next-token logits out (float32)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = nnx.Param(
        jax.random.normal(rngs.params(), (config.vocab_size, config.d_model)) / math.sqrt(
            config.d_model), logical_axes=("vocab", "embed"))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps)
    self.head = None if config.tie_embeddings else Dense(
        config.d_model, config.vocab_size, rngs=rngs, axes=("embed", "vocab"), use_bias=False)

  def _run(self, tokens: jax.Array, positions: jax.Array, attend: Attend) -> jax.Array:
    x = jnp.take(self.embed[...], tokens, axis=0)  # [..., D]
    for layer, block in enumerate(self.blocks):
      x = block(layer, x, positions, attend)
    return self.final_norm(x)

  def _logits(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., V]
    if self.head is None:
      return jnp.einsum("...D,VD->...V", x, self.embed[...]).astype(jnp.float32)
    return self.head(x).astype(jnp.float32)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Full forward: tokens [B, T] -> logits [B, T, V]; position t sees tokens 0..t only."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return self._logits(self._run(tokens, positions, lambda _, q, k, v: causal_attention(q, k, v)))

  def prefill(
      self,
      tokens: jax.Array,  # [B, T] int32, right-padded
      lengths: jax.Array,  # [B] int32, valid tokens per row (0: padding row)
      page_table: jax.Array,  # [B, P] int32, page i holds positions [i*ps, (i+1)*ps)
      cache: Cache,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fills the pages with the prompts' K/V -> (logits [B, V] at position lengths-1, cache)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    page, offset = _slots(page_table, positions, positions < lengths[:, None],
                          cache["k_pages"].shape[3])
    new = dict(cache)

    def attend(layer, q, k, v):  # q [B, T, N, H], k/v [B, T, K, H]
      new.update(_write(new, layer, page, offset, k, v))
      o = flash_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                          v.transpose(0, 2, 1, 3), lengths=lengths, causal=True,
                          impl=self.config.attention_impl)
      return o.transpose(0, 2, 1, 3)

    x = self._run(tokens, positions, attend)  # [B, T, D]
    last = jnp.clip(lengths - 1, 0, t - 1)
    x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [B, D]
    return self._logits(x_last), new

  def decode_step(
      self,
      tokens: jax.Array,  # [B] int32, the newest token of each row
      positions: jax.Array,  # [B] int32, its position
      page_table: jax.Array,  # [B, P] int32
      lengths: jax.Array,  # [B] int32, tokens to attend to incl. this one (0: idle row)
      cache: Cache,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Writes each row's K/V at `positions`, attends over its pages -> (logits [B, V], cache)."""
    page, offset = _slots(page_table, positions, lengths > 0, cache["k_pages"].shape[3])
    new = dict(cache)

    def attend(layer, q, k, v):  # q [B, N, H], k/v [B, K, H]
      new.update(_write(new, layer, page, offset, k, v))
      return paged_attention(
          q, new["k_pages"][layer], new["v_pages"][layer], page_table, lengths,
          k_scale=new["k_scale"][layer] if "k_scale" in new else None,
          v_scale=new["v_scale"][layer] if "v_scale" in new else None,
          impl=self.config.attention_impl)

    return self._logits(self._run(tokens, positions, attend)), new

  def extend(
      self,
      tokens: jax.Array,  # [B, C] int32, the chunk, right-padded
      starts: jax.Array,  # [B] int32, position of each row's first chunk token
      lengths: jax.Array,  # [B] int32, valid chunk tokens per row (0: idle row)
      page_table: jax.Array,  # [B, P] int32, pages of the whole sequence
      cache: Cache,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Writes the chunk's K/V at starts.., attends to positions 0.. of the sequence's pages ->
    (logits [B, V] at position starts + lengths - 1, cache). With starts 0 it is `prefill`."""
    x, new = self._chunk(tokens, starts, lengths, page_table, cache)  # [B, C, D]
    last = jnp.clip(lengths - 1, 0, tokens.shape[1] - 1)
    return self._logits(jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]), new

  def verify(self, tokens: jax.Array, starts: jax.Array, lengths: jax.Array,
             page_table: jax.Array, cache: Cache) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`extend` returning the logits at every chunk position [B, C, V] (speculative decoding
    scores all draft tokens in one pass); padded positions' logits are garbage."""
    x, new = self._chunk(tokens, starts, lengths, page_table, cache)
    return self._logits(x), new

  def _chunk(self, tokens: jax.Array, starts: jax.Array, lengths: jax.Array,
             page_table: jax.Array, cache: Cache) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The chunk pass of `extend`/`verify`: final hidden states [B, C, D] and the new cache."""
    b, c = tokens.shape
    positions = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]  # [B, C]
    page, offset = _slots(page_table, positions, jnp.arange(c)[None, :] < lengths[:, None],
                          cache["k_pages"].shape[3])
    new = dict(cache)

    def attend(layer, q, k, v):  # q [B, C, N, H], k/v [B, C, K, H]
      new.update(_write(new, layer, page, offset, k, v))
      return paged_chunk_attention(
          q, new["k_pages"][layer], new["v_pages"][layer], page_table, positions,
          k_scale=new["k_scale"][layer] if "k_scale" in new else None,
          v_scale=new["v_scale"][layer] if "v_scale" in new else None)

    return self._run(tokens, positions, attend), new


def _slots(page_table: jax.Array, positions: jax.Array, valid: jax.Array,
           page_size: int) -> tuple[jax.Array, jax.Array]:
  """(page, offset) where each position's K/V goes; invalid positions go to NULL_PAGE."""
  col = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
  page = jnp.take_along_axis(page_table, col.reshape(col.shape[0], -1), axis=1).reshape(col.shape)
  return (jnp.where(valid, page, NULL_PAGE).astype(jnp.int32),
          jnp.where(valid, positions % page_size, 0).astype(jnp.int32))


def _write(cache: Cache, layer: int, page: jax.Array, offset: jax.Array, k: jax.Array,
           v: jax.Array) -> dict[str, jax.Array]:
  """Scatters k/v [S..., K, H] into `layer` of the cache at (page, offset) [S...]."""
  out = {}
  for name, x in (("k", k), ("v", v)):
    pages = cache[f"{name}_pages"]
    if pages.dtype == jnp.int8:
      xq, scale = quantize_kv(x)
      out[f"{name}_pages"] = pages.at[layer, :, page, offset].set(xq)
      out[f"{name}_scale"] = cache[f"{name}_scale"].at[layer, :, page, offset].set(scale)
    else:
      out[f"{name}_pages"] = pages.at[layer, :, page, offset].set(x.astype(pages.dtype))
  return out


def init_cache(config: DecoderConfig, *, num_pages: int, page_size: int,
               kv_dtype: str = "float32") -> dict[str, jax.Array]:
  """Zeroed KV cache arrays (tests and reference runs; the engine allocates its own)."""
  return {name: jnp.zeros(shape, dtype) for name, (shape, dtype) in
          cache_shapes(config, num_pages=num_pages, page_size=page_size, kv_dtype=kv_dtype).items()}


def greedy_reference(model: Decoder, prompts: Sequence[Sequence[int]], *,
                     max_new_tokens: int | Sequence[int], eos_id: int | None) -> list[list[int]]:
  """Greedy generation one sequence at a time with the full forward (no cache, no kernels).

  Each step runs the whole sequence padded to `max_seq_len` (causal, so the padding is never
  seen): one compiled shape for any prompt. `max_new_tokens` is one limit or one per prompt.
  """
  limits = ([max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int)
            else list(max_new_tokens))
  graphdef, state = nnx.split(model)
  max_len = model.config.max_seq_len

  @jax.jit
  def next_token(state, tokens, position):  # tokens [1, max_len]
    logits = nnx.merge(graphdef, state)(tokens)[0, position]
    return jnp.argmax(logits).astype(jnp.int32)

  outs = []
  for prompt, limit in zip(prompts, limits, strict=True):
    seq, gen = list(prompt), []
    while len(gen) < limit and len(seq) < max_len:
      padded = np.zeros((1, max_len), np.int32)
      padded[0, :len(seq)] = seq
      tok = int(next_token(state, padded, len(seq) - 1))
      gen.append(tok)
      seq.append(tok)
      if tok == eos_id:
        break
    outs.append(gen)
  return outs
