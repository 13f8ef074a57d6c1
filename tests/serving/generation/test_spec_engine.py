"""Speculative decoding on the real tiny LM: the verify pass, greedy parity, the rejection rule.

The sampled checks compare against the target's exact probabilities computed independently in
numpy from the model's full forward (or from the logits given), with a chi-square test over
thousands of draws; `test_a_wrong_rule_fails_the_same_check` runs the same check on a broken
rule to show it can fail.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from scipy import stats

from genutil import Stream
from models.decoder import greedy_reference, init_cache
from serving.generation.engine_api import sampling_arrays
from serving.generation.request import GenerationRequest, SamplingParams
from serving.generation.spec_sampling import verify_tokens
from serving.generation.speculative import SpeculativeConfig

EOS = 257
ALPHA = 1e-4  # chi-square p-value below which a distribution is rejected (fixed seeds: no flake)


def probs_np(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
  """The distribution sample_tokens draws from, in float64 numpy: softmax over the top_k."""
  x = logits.astype(np.float64) / temperature
  keep = np.argsort(-x)[:top_k] if top_k else np.arange(len(x))
  p = np.zeros_like(x)
  p[keep] = np.exp(x[keep] - x[keep].max())
  return p / p.sum()


def chi2_pvalue(draws: np.ndarray, p: np.ndarray) -> float:
  """Goodness of fit of integer draws to p (cells of expected count < 5 pooled)."""
  counts = np.bincount(draws, minlength=len(p)).astype(np.float64)
  expected = p * len(draws)
  if counts[expected == 0].sum():
    return 0.0  # a draw outside the support
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
  return float(stats.chisquare(obs, exp).pvalue) if len(obs) > 1 else 1.0


@functools.cache
def _verify_fn():
  return jax.jit(lambda logits, tokens, lengths, s: verify_tokens(logits, tokens, lengths, **s))


def synthetic_check(rule=None) -> list[float]:
  """p-values of: first token ~ p_0; second ~ p_1 given d_1 accepted; third ~ p_2 given both."""
  rows, c, v = 20_000, 3, 7
  logits = np.random.default_rng(1).normal(size=(c, v)).astype(np.float32) * 1.5
  p = [probs_np(logits[j], 1.0, 0) for j in range(c)]
  d1, d2 = int(np.argsort(-p[0])[1]), int(np.argmax(p[1]))  # a likely-rejected, a likely one
  tokens = np.tile(np.array([0, d1, d2], np.int32), (rows, 1))
  samp = sampling_arrays([(r, SamplingParams(temperature=1.0), r, 0) for r in range(rows)], rows)
  fn = rule or _verify_fn()
  emitted, counts = (np.asarray(x) for x in fn(np.broadcast_to(logits, (rows, c, v)), tokens,
                                               np.full(rows, c, np.int32), samp))
  one, both = emitted[:, 0] == d1, (emitted[:, 0] == d1) & (emitted[:, 1] == d2)
  assert rule is not None or (counts == 1 + one + both).all()
  return [chi2_pvalue(emitted[:, 0], p[0]), chi2_pvalue(emitted[one, 1], p[1]),
          chi2_pvalue(emitted[both, 2], p[2])]


def test_rejection_rule_matches_the_target_distribution():
  assert min(synthetic_check()) > ALPHA


def test_a_wrong_rule_fails_the_same_check():
  """Resampling from p itself after a rejection (not p with the draft removed) over-weights
  the draft token: the check must catch it."""
  def wrong(logits, tokens, lengths, s):
    emitted, counts = (np.asarray(x).copy() for x in _verify_fn()(logits, tokens, lengths, s))
    plain = np.asarray(_verify_fn()(logits[:, :1], tokens[:, :1], np.ones_like(lengths), s)[0])
    rejected = counts == 1
    emitted[rejected, 0] = plain[rejected, 0]  # a draw from p_0, the draft not removed
    return emitted, counts

  assert synthetic_check(wrong)[0] < ALPHA


def test_verify_logits_equal_the_full_forward(tiny_model):
  cfg = tiny_model.config
  rng = np.random.default_rng(2)
  seq = rng.integers(0, 256, 30).astype(np.int32)
  table = np.zeros((1, cfg.max_seq_len // 8), np.int32)
  table[0, :4] = [5, 3, 9, 1]
  cache = init_cache(cfg, num_pages=12, page_size=8)
  _, cache = jax.jit(tiny_model.extend)(np.pad(seq[:25], (0, 7))[None], np.zeros(1, np.int32),
                                        np.array([25], np.int32), table, cache)
  logits, _ = jax.jit(tiny_model.verify)(np.pad(seq[24:], (0, 2))[None],
                                         np.array([24], np.int32), np.array([6], np.int32),
                                         table, cache)
  want = np.asarray(tiny_model(seq[None]))[0, 24:]
  np.testing.assert_allclose(np.asarray(logits)[0, :6], want, atol=1e-4)


def test_engine_verify_samples_the_target_distribution(tiny_engine, tiny_model):
  """The compiled verify executable (exported logits + on-device rejection), temperature 1.5
  and top_k 6, vs numpy probabilities from the full forward. After a brand the product's
  first letter is uncertain, so the draft is both accepted and rejected often."""
  eng, sp = tiny_engine, tiny_engine.spec
  prompt = [256, *b"Summit "]
  full = np.asarray(tiny_model(np.array([prompt + [32]], np.int32)))[0]
  p0 = probs_np(full[len(prompt) - 1], 1.5, 6)
  d1 = int(np.argsort(-p0)[1])  # the second most likely: accepted about p0[d1] of the time
  full = np.asarray(tiny_model(np.array([prompt + [d1]], np.int32)))[0]
  p1 = probs_np(full[len(prompt)], 1.5, 6)
  b = sp.verify_buckets[0]
  table = np.zeros((b.batch, sp.pages_per_seq), np.int32)
  table[:, :8] = np.arange(1, 9)  # every row reads the same pages (and writes equal K/V)
  pad = np.full((1, 128), sp.pad_id, np.int32)
  pad[0, :len(prompt) - 1] = prompt[:-1]
  eng.prefill(bucket=sp.prefill_buckets[-1], tokens=np.repeat(pad, sp.prefill_buckets[-1].batch,
                                                                0),
              lengths=np.eye(sp.prefill_buckets[-1].batch, dtype=np.int32)[0] * (len(prompt) - 1),
              page_table=table[:sp.prefill_buckets[-1].batch], sampling=sampling_arrays(
                  (), sp.prefill_buckets[-1].batch))
  tokens = np.full((b.batch, b.length), sp.pad_id, np.int32)
  tokens[:, :2] = [prompt[-1], d1]
  firsts, seconds = [], []
  for call in range(300):
    samp = sampling_arrays([(r, SamplingParams(temperature=1.5, top_k=6), call * b.batch + r, 0)
                            for r in range(b.batch)], b.batch)
    emitted, counts = eng.verify(bucket=b, tokens=tokens, starts=np.full(b.batch, len(prompt) - 1,
                                                                          np.int32),
                                 lengths=np.full(b.batch, 2, np.int32), page_table=table,
                                 sampling=samp)
    firsts += emitted[:, 0].tolist()
    seconds += emitted[counts == 2, 1].tolist()
  eng.reset()
  assert chi2_pvalue(np.array(firsts), p0) > ALPHA
  assert chi2_pvalue(np.array(seconds), p1) > ALPHA
  assert 0.1 < len(seconds) / len(firsts) < 0.9  # both branches exercised


AD_PROMPTS = [b"Acme running shoes: save 20% today. Acme running shoes:",
              b"Lumen desk lamps, Lumen desk lamps, Lumen",
              b"Write an ad. Product: tea sets. Ad: Harbor tea sets:",
              b"zq8#kv!"]


def run(svc, cases, **sampling):
  streams = []
  for prompt, n in cases:
    s = Stream()
    svc.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=n, **sampling)), s)
    streams.append(s)
  return [s.wait(120) and s.tokens for s in streams]


def test_greedy_speculation_is_token_for_token_plain_greedy(service, tiny_model):
  cases = [(p, n) for p in AD_PROMPTS for n in (1, 7, 30)]
  spec = service(speculative=SpeculativeConfig(num_tokens=4))
  got = run(spec, cases)
  st = spec.stats()
  assert st["spec_accepted_tokens"] > 0 and st["spec_draft_tokens"] > st["spec_accepted_tokens"]
  assert run(service(), cases) == got
  want = greedy_reference(tiny_model, [[256, *p] for p, _ in cases],
                          max_new_tokens=[n for _, n in cases], eos_id=EOS)
  assert got == want


def test_seeded_sampling_with_speculation_is_reproducible(service):
  """Same seed and K: the same tokens, whatever the batch order (another K draws other,
  equally distributed, tokens)."""
  cases = [(p, 20) for p in AD_PROMPTS]
  a = run(service(speculative=SpeculativeConfig(num_tokens=4)), cases, temperature=0.8, seed=7)
  assert a[0] != a[1] and all(len(t) == 20 or EOS in t for t in a)
  b = run(service(speculative=SpeculativeConfig(num_tokens=4)), cases[::-1], temperature=0.8,
          seed=7)
  assert b[::-1] == a


def test_no_compiles_after_warmup_speculative(service, compile_counter):
  before = compile_counter.outside_warmup
  svc = service(speculative=SpeculativeConfig(num_tokens=4), max_num_batched_tokens=12)
  run(svc, [(p, 12) for p in AD_PROMPTS], temperature=1.0, top_p=0.9)
  run(svc, [(p, 9) for p in AD_PROMPTS])
  assert compile_counter.outside_warmup == before


def test_logprobs_with_speculation_equal_plain_decoding(service):
  cases = [(AD_PROMPTS[0], 12)]
  streams = []
  for svc in (service(speculative=SpeculativeConfig(num_tokens=4)), service()):
    s = Stream()
    svc.submit(GenerationRequest(cases[0][0], SamplingParams(max_new_tokens=12, logprobs=3)), s)
    s.wait(120)
    streams.append(s)
  a, b = ([(e.token_id, e.logprob, [t for t, _ in e.top_logprobs]) for e in s.events
           if e.token_id is not None] for s in streams)
  assert [x[0] for x in a] == [x[0] for x in b] and [x[2] for x in a] == [x[2] for x in b]
  np.testing.assert_allclose([x[1] for x in a], [x[1] for x in b], atol=1e-4)


@pytest.fixture(scope="module")
def no_verify_bundle(tiny_model, tmp_path_factory):
  import dataclasses

  from export.generative import GenerativeExportConfig, export_generative

  config = dataclasses.replace(GenerativeExportConfig.tiny(), verify_lengths=(),
                               prefill_lengths=(128,), chunk_lengths=(16,))
  return export_generative(tiny_model, tmp_path_factory.mktemp("repo") / "old" / "1", config)


def test_a_bundle_without_verify_signatures_refuses_speculation(no_verify_bundle):
  from bundle import BundleError
  from serving.generation.service import GenerationService, ServiceConfig

  with pytest.raises(BundleError, match="verify_<C> signatures.*re-export"):
    GenerationService.from_bundle(no_verify_bundle, config=ServiceConfig(
        speculative=SpeculativeConfig()))


@pytest.fixture(scope="module")
def draft_engine(tmp_path_factory, compile_counter):
  """A smaller-trained tiny LM (other seed, 40 steps) as the draft: same export geometry."""
  import dataclasses

  from flax import nnx

  from export.generative import GenerativeExportConfig, ad_corpus, export_generative, train
  from models.decoder import Decoder, DecoderConfig
  from models.tokenizer import ByteTokenizer
  from serving.generation.engine import BundleEngine

  config = dataclasses.replace(GenerativeExportConfig.tiny(), train_steps=40, seed=5,
                               prefill_lengths=(128,), verify_lengths=())
  model = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(5))
  train(model, ad_corpus(seed=5), config, ByteTokenizer())
  path = export_generative(model, tmp_path_factory.mktemp("repo") / "draft" / "1", config)
  engine = BundleEngine(path, compile_counter=compile_counter)
  yield engine
  engine.close()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_draft_model_keeps_the_targets_greedy_output(tiny_engine, draft_engine, tiny_model,
                                                       temperature):
  """Greedy: the target's own greedy tokens with a draft LM proposing; sampled: runs clean
  (the rule itself is checked above). Drafts are both accepted and rejected."""
  from serving.generation.service import GenerationService, ServiceConfig

  svc = GenerationService(tiny_engine, config=ServiceConfig(
      speculative=SpeculativeConfig(method="draft", num_tokens=3), max_num_batched_tokens=24),
                          draft=draft_engine).start()
  cases = [(p, n) for p in AD_PROMPTS for n in (5, 24)]
  try:
    got = run(svc, cases, temperature=temperature, seed=3)
    st = svc.stats()
  finally:
    svc.stop()
  assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"]
  assert st["kv_pages_used"] == 0
  if temperature == 0:
    assert got == greedy_reference(tiny_model, [[256, *p] for p, _ in cases],
                                   max_new_tokens=[n for _, n in cases], eos_id=EOS)
