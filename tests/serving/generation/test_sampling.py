"""sample_tokens: greedy, top-k, top-p, seeded reproducibility, per-row independence."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from serving.generation.engine_api import sampling_arrays
from serving.generation.request import SamplingParams
from serving.generation.sampling import sample_tokens, token_logprobs, uniform_noise

B, V = 8, 50


@functools.cache
def sampler():
  return jax.jit(lambda logits, s: sample_tokens(logits, **s))


def run(logits, rows):
  return np.asarray(sampler()(logits, sampling_arrays(rows, logits.shape[0])))


@pytest.fixture(scope="module")
def logits():
  return np.random.default_rng(0).normal(size=(B, V)).astype(np.float32) * 2


def test_greedy_rows_take_the_argmax(logits):
  assert (run(logits, ()) == logits.argmax(-1)).all()


def test_top_k_1_equals_greedy_at_any_temperature(logits):
  rows = [(r, SamplingParams(temperature=t, top_k=1), 100 + r, 3) for r, t in
          enumerate([0.5, 1.0, 2.0, 10.0, 0.5, 1.0, 2.0, 10.0])]
  assert (run(logits, rows) == logits.argmax(-1)).all()


def test_tiny_top_p_equals_greedy(logits):
  rows = [(r, SamplingParams(temperature=1.0, top_p=1e-6), r, 0) for r in range(B)]
  assert (run(logits, rows) == logits.argmax(-1)).all()


def test_seeded_draws_depend_only_on_seed_step_and_logits(logits):
  p = SamplingParams(temperature=1.0)
  a = run(logits, [(r, p, 42, 5) for r in range(B)])
  assert (a == run(logits, [(r, p, 42, 5) for r in range(B)])).all()
  # Row 3 alone, next to greedy rows and in another batch position: the same token.
  solo = np.zeros_like(logits)
  solo[6] = logits[3]
  assert run(solo, [(6, p, 42, 5)])[6] == a[3]
  # Different seeds or steps give different draws somewhere.
  assert (a != run(logits, [(r, p, 43, 5) for r in range(B)])).any()
  assert (a != run(logits, [(r, p, 42, 6) for r in range(B)])).any()


def test_top_k_and_top_p_restrict_the_support(logits):
  row = np.tile(logits[0], (B, 1))
  order = np.argsort(-logits[0])
  top3 = set(order[:3].tolist())
  probs = np.exp(logits[0] - logits[0].max())
  probs /= probs.sum()
  cum = np.cumsum(probs[order])
  nucleus = set(order[:int(np.searchsorted(cum, 0.5)) + 1].tolist())
  seen_k, seen_p = set(), set()
  for step in range(40):
    seen_k |= set(run(row, [(r, SamplingParams(temperature=5.0, top_k=3), r, step)
                            for r in range(B)]).tolist())
    seen_p |= set(run(row, [(r, SamplingParams(temperature=1.0, top_p=0.5), r, step)
                            for r in range(B)]).tolist())
  assert seen_k == top3
  assert seen_p == nucleus and len(nucleus) >= 2


def test_temperature_sampling_follows_the_softmax():
  logits = np.log(np.array([[0.6, 0.3, 0.1] + [1e-9] * 5], np.float32)).repeat(B, 0)
  counts = np.zeros(8)
  for step in range(250):
    for t in run(logits, [(r, SamplingParams(temperature=1.0), r, step) for r in range(B)]):
      counts[t] += 1
  freq = counts / counts.sum()  # 2000 draws
  np.testing.assert_allclose(freq[:3], [0.6, 0.3, 0.1], atol=0.04)


def test_uniform_noise_is_in_range_and_uncorrelated():
  u = np.asarray(uniform_noise(np.arange(64, dtype=np.int32), np.zeros(64, np.int32), 1000))
  assert 0 < u.min() and u.max() < 1
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 0.2887) < 0.01
  assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.02


def test_token_logprobs_are_the_raw_log_softmax(logits):
  tokens = np.arange(B, dtype=np.int32) % V  # any tokens, not only the best
  chosen, ids, values = (np.asarray(x) for x in jax.jit(
      lambda x, t: token_logprobs(x, t, 5))(logits, tokens))
  shifted = logits - logits.max(-1, keepdims=True)  # the reference, in float64
  ref = shifted - np.log(np.exp(shifted.astype(np.float64)).sum(-1, keepdims=True))
  np.testing.assert_allclose(chosen, ref[np.arange(B), tokens], atol=1e-5)
  np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1)[:, :5])
  np.testing.assert_allclose(values, np.take_along_axis(ref, ids, -1), atol=1e-5)
