"""Decoder LM: paged prefill/decode agree with the full forward; params name their axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.decoder import NULL_PAGE, DecoderConfig, init_cache, quantize_kv, rope
from sharding.plan import ShardingPlan
from sharding.rules import LOGICAL_AXES, STRATEGIES


@pytest.fixture(scope="module")
def model(tiny_model):
  return tiny_model


@pytest.fixture(scope="module")
def forward(model):
  """Full-forward logits of each sequence, padded to max_seq_len: one compiled shape."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  n = model.config.max_seq_len

  def run(seqs):
    padded = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
      padded[i, :len(s)] = s
    return np.asarray(fn(state, padded))

  return run


def test_every_param_names_its_logical_axes(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var[...].ndim, path
    assert set(axes) <= set(LOGICAL_AXES), (path, axes)


def test_every_param_resolves_to_a_partition_spec(model):
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  for strategy in STRATEGIES:
    plan = ShardingPlan.create(strategy, 2)
    specs = {path: plan.spec_for(var.get_metadata()["logical_axes"], var[...].shape)
             for path, var in params}
    if strategy == "tensor":  # Megatron: heads and the MLP hidden split over `model`
      assert tuple(specs[("blocks", 0, "attn", "wq")]) == (None, "model", None)
      assert tuple(specs[("blocks", 0, "mlp", "down", "kernel")]) == ("model", None)


def test_presets_and_validation():
  demo = DecoderConfig.demo()
  assert (demo.num_layers, demo.d_model, demo.num_heads, demo.num_kv_heads, demo.vocab_size) == (
      4, 256, 8, 2, 259)
  assert demo.tie_embeddings and not DecoderConfig.tiny().tie_embeddings
  with pytest.raises(ValueError, match="multiple"):
    DecoderConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="even"):
    DecoderConfig(head_dim=15)
  with pytest.raises(ValueError, match="impl"):
    DecoderConfig(attention_impl="cuda")


def test_rope_rotates_by_relative_position():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 1, 8)).astype(np.float32)
  dots = [float(jnp.sum(rope(q, jnp.array(p + 5), 1e4) * rope(k, jnp.array(p), 1e4)))
          for p in (0, 3, 11)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)


def test_full_forward_is_causal(forward):
  tokens = np.random.default_rng(0).integers(0, 256, 12)
  changed = tokens.copy()
  changed[8:] = (changed[8:] + 1) % 256
  a, b = forward([tokens, changed])
  np.testing.assert_allclose(a[:8], b[:8], atol=1e-5)
  assert not np.allclose(a[8:12], b[8:12])


@pytest.mark.parametrize("kv_dtype, atol", [("float32", 2e-4), ("int8", 0.3)])
def test_paged_prefill_then_decode_match_the_full_forward(model, forward, kv_dtype, atol):
  rng = np.random.default_rng(1)
  ps, num_pages, batch, t = 8, 40, 3, 32
  pps = model.config.max_seq_len // ps
  lengths = np.array([32, 5, 17], np.int32)
  tokens = rng.integers(0, 256, (batch, t)).astype(np.int32)
  # Scattered, non-contiguous pages per row; unused entries point at the null page.
  perm = rng.permutation(np.arange(1, num_pages))
  table = np.zeros((batch, pps), np.int32)
  for b in range(batch):
    table[b, :6] = perm[6 * b:6 * b + 6]
  cache = init_cache(model.config, num_pages=num_pages, page_size=ps, kv_dtype=kv_dtype)
  logits, cache = jax.jit(model.prefill)(tokens, lengths, table, cache)
  full = forward(list(tokens))
  want = full[np.arange(batch), lengths - 1]
  np.testing.assert_allclose(logits, want, atol=2e-4)  # prefill attends unquantized K/V

  seqs = [list(tokens[b, :lengths[b]]) for b in range(batch)]
  step = jax.jit(model.decode_step)
  for _ in range(10):
    nxt = rng.integers(0, 256, batch).astype(np.int32)
    pos = np.array([len(s) for s in seqs], np.int32)
    for s, n in zip(seqs, nxt):
      s.append(int(n))
    logits, cache = step(nxt, pos, table, pos + 1, cache)
    ref = forward(seqs)[np.arange(batch), pos]
    np.testing.assert_allclose(logits, ref, atol=atol)


def test_idle_rows_write_only_the_null_page(model):
  ps, num_pages = 8, 10
  pps = model.config.max_seq_len // ps
  cache = init_cache(model.config, num_pages=num_pages, page_size=ps)
  cache = {k: v + 1.0 for k, v in cache.items()}  # recognisable contents
  table = np.tile(np.arange(1, 1 + pps, dtype=np.int32) % num_pages, (2, 1))
  _, after = jax.jit(model.prefill)(np.ones((2, 16), np.int32), np.zeros(2, np.int32), table,
                                    cache)
  _, after = jax.jit(model.decode_step)(np.ones(2, np.int32), np.array([3, 9], np.int32), table,
                                        np.zeros(2, np.int32), after)
  for name in cache:
    keep = np.arange(num_pages) != NULL_PAGE
    np.testing.assert_array_equal(np.asarray(after[name])[:, :, keep],
                                  np.asarray(cache[name])[:, :, keep])


def test_quantize_kv_round_trip():
  x = np.random.default_rng(0).normal(size=(4, 2, 16)).astype(np.float32)
  q, scale = quantize_kv(jnp.asarray(x))
  assert q.dtype == jnp.int8 and scale.shape == (4, 2)
  np.testing.assert_allclose(np.asarray(q, np.float32) * np.asarray(scale)[..., None], x,
                             atol=np.abs(x).max() / 127)
