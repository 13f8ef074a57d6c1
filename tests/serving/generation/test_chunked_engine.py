"""Chunked prefill and prefix caching on the real tiny LM: numerics, greedy parity, zero compiles."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest

from genutil import Stream
from models.decoder import greedy_reference, init_cache
from serving.generation.request import GenerationRequest, SamplingParams

EOS = 257
# Float32 logits of a prompt prefilled in chunks vs in one shot (measured: ~2e-6).
CHUNK_ATOL = 1e-4
INSTRUCTION = b"Write one line of ad copy for this product. Product: "  # 53 bytes, 6 full pages


def test_extend_in_chunks_equals_one_shot_prefill(tiny_model):
  """Logits within CHUNK_ATOL, the same greedy token and equal K/V pages, whatever the chunk
  boundaries (one padded chunk shape, so one compile)."""
  cfg = tiny_model.config
  ps, num_pages, length = 8, 24, 57
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, length).astype(np.int32)
  table = np.zeros((1, cfg.max_seq_len // ps), np.int32)
  table[0, :8] = rng.permutation(np.arange(1, num_pages))[:8]  # scattered pages
  want, want_cache = jax.jit(tiny_model.prefill)(
      np.pad(tokens, (0, 64 - length))[None], np.array([length], np.int32), table,
      init_cache(cfg, num_pages=num_pages, page_size=ps))
  extend = jax.jit(tiny_model.extend)
  for chunks in ((16, 16, 16, 16), (5, 32, 1, 32), (64,)):
    cache, start = init_cache(cfg, num_pages=num_pages, page_size=ps), 0
    for c in chunks:
      n = min(c, length - start)
      chunk = np.zeros((1, 64), np.int32)
      chunk[0, :n] = tokens[start:start + n]
      logits, cache = extend(chunk, np.array([start], np.int32), np.array([n], np.int32), table,
                             cache)
      start += n
    assert start == length
    np.testing.assert_allclose(logits, want, atol=CHUNK_ATOL)
    assert int(np.argmax(logits)) == int(np.argmax(want))
    for name in cache:  # the null page takes padding writes and differs; the others are equal
      np.testing.assert_allclose(np.asarray(cache[name])[:, :, 1:],
                                 np.asarray(want_cache[name])[:, :, 1:], atol=1e-5)


def ad_prompts(n: int, seed: int) -> list[bytes]:
  rng = random.Random(seed)
  products = [b"running shoes", b"tea sets", b"wool socks", b"desk lamps", b"headphones"]
  return [INSTRUCTION + rng.choice(products)[:rng.randint(1, 13)] for _ in range(n)]


def run(svc, cases):
  streams = []
  for prompt, n in cases:
    s = Stream()
    svc.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=n)), s)
    streams.append(s)
  return [s.wait(120) and s.tokens for s in streams]


def test_small_budget_chunks_and_prefix_hits_equal_greedy_reference(service, tiny_model):
  """Shared-prefix prompts and a long one, with an 9-token budget (chunks of 1-16 tokens beside
  the decodes) and the prefix cache, then without either: greedy token for token."""
  rng = random.Random(3)
  cases = [(p, rng.randint(4, 16)) for p in ad_prompts(8, seed=1)]
  cases.append((bytes(rng.randrange(32, 127) for _ in range(100)), 12))  # a long prompt
  chunked = service(max_num_batched_tokens=9)
  got = run(chunked, cases)
  st = chunked.stats()
  assert st["prefix_cache_hits"] >= 7 * 48, st  # all but the first share 6 pages of 8
  whole = service(chunked_prefill=False)
  assert run(whole, cases) == got
  wants = greedy_reference(tiny_model, [[256, *p] for p, _ in cases],
                           max_new_tokens=[n for _, n in cases], eos_id=EOS)
  assert got == wants


def test_prefix_hit_equals_no_cache(service):
  cases = [(p, 10) for p in ad_prompts(6, seed=2)]
  cached = service()
  run(cached, cases[:1])  # the instruction's pages are now cached
  hits = cached.stats()["prefix_cache_hits"]
  got = run(cached, cases)
  assert cached.stats()["prefix_cache_hits"] - hits >= 6 * 48
  assert run(service(prefix_caching=False), cases) == got


def test_no_compiles_after_warmup_chunked(service, compile_counter):
  before = compile_counter.outside_warmup
  rng = random.Random(4)
  for budget in (8, 13, 40):
    svc = service(max_num_batched_tokens=budget)
    streams = []
    for i, p in enumerate(ad_prompts(10, seed=budget)):
      s = Stream()
      p = p[:rng.randint(1, len(p))] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 50)))
      svc.submit(GenerationRequest(p, SamplingParams(max_new_tokens=rng.randint(1, 8),
                                                     temperature=rng.choice([0, 1.0]), seed=i)), s)
      streams.append(s)
    for s in streams:
      s.wait(120)
  assert compile_counter.outside_warmup == before
