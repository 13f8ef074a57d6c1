"""Speculative decoding without JAX: n-gram drafts, page accounting, the service over MockEngine."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from bundle import BundleError
from genutil import Stream
from serving.generation.chunking import ChunkConfig
from serving.generation.metrics import GenerationCollector
from serving.generation.mock_engine import MockEngine, mock_spec
from serving.generation.ngram import ngram_propose
from serving.generation.request import FinishReason, GenerationRequest, SamplingParams
from serving.generation.scheduler import PrefillBucket, SchedulerConfig
from serving.generation.service import GenerationService, ServiceConfig
from serving.generation.speculative import SpeculativeConfig, SpeculativeScheduler

PS = 4
EXTEND = ((4, 4), (8, 2), (16, 1))


def test_imports_without_jax():
  code = ("import sys, serving.generation.speculative, serving.generation.ngram;"
          " sys.exit('jax' in sys.modules)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def brute_force_draft(tokens, k, max_n, min_n):
  for n in range(max_n, min_n - 1, -1):
    if len(tokens) <= n:
      continue
    tail = tokens[-n:]
    for i in range(len(tokens) - n - 1, -1, -1):  # most recent match followed by a token
      if tokens[i:i + n] == tail:
        return tokens[i + n:i + n + k]
  return []


def test_ngram_drafts_equal_brute_force():
  rng = random.Random(0)
  for _ in range(3000):
    alphabet = rng.choice([2, 3, 300])  # ids above 255 take several bytes each
    tokens = [rng.randrange(alphabet) * (1 if alphabet < 300 else 257) % 300
              for _ in range(rng.randint(0, 25))]
    k, max_n = rng.randint(1, 5), rng.randint(1, 4)
    min_n = rng.randint(1, max_n)
    assert ngram_propose(tokens, k, max_n=max_n, min_n=min_n) == brute_force_draft(
        tokens, k, max_n, min_n), (tokens, k, max_n, min_n)


def repeat_rule(seq):
  """Continues a period-3 pattern, so n-gram drafts are often, not always, right."""
  return seq[-3] if len(seq) >= 3 and len(seq) % 7 else (seq[-1] * 5 + 1) % 50


def scheduler(**kw):
  chunk = ChunkConfig((PrefillBucket(4, 2), PrefillBucket(8, 1)), kw.pop("budget", 10),
                      kw.pop("caching", True))
  cfg = SchedulerConfig(decode_batch=4, page_size=PS, num_pages=kw.pop("num_pages", 25),
                        max_seq_len=40, prefill_buckets=(PrefillBucket(40, 1),))
  return SpeculativeScheduler(cfg, chunk, SpeculativeConfig(num_tokens=kw.pop("k", 3)))


def run(s: SpeculativeScheduler, stats: dict):
  """One step as the service runs it: chunks, then every decode row's accepted drafts plus
  one token (the mock's greedy verification), never past the length limit."""
  step = s.schedule()
  for b in step.chunks:
    for r in b.rows:
      s.chunk_done(r)
      if r.last:
        s.append_token(r.seq_id, repeat_rule(s.get(r.seq_id).tokens))
  for r in (step.decode.rows if step.decode else ()):
    seq, pool = s.get(r.seq_id), s.pool
    assert r.position == len(seq.tokens) - 1 and len(r.pages) * PS >= len(seq.tokens) + len(r.draft)
    for pos in range(r.position, r.position + 1 + len(r.draft)):  # never a shared page
      assert r.pages[pos // PS] not in pool._key_of, (r, pos)
    stats["drafts"] += len(r.draft)
    for d in (*r.draft, None):
      t = repeat_rule(seq.tokens)
      if s.append_token(r.seq_id, t) or t != d:
        break
      stats["accepted"] += 1
  s.check()


@pytest.mark.parametrize("caching", [True, False])
def test_thousands_of_random_requests_with_speculation_free_every_page(caching):
  rng = random.Random(6)
  s = scheduler(num_pages=21, budget=9, caching=caching)
  prefixes = [[rng.randrange(50) for _ in range(rng.randint(4, 20))] for _ in range(5)]
  live, n, stats = [], 0, {"drafts": 0, "accepted": 0}
  while n < 2000 or live:
    if n < 2000 and rng.random() < 0.5:
      prompt = rng.choice(prefixes)[:rng.randint(1, 20)] + [rng.randrange(50)
                                                           for _ in range(rng.randint(0, 6))]
      s.add(n, prompt[:38] or [1], rng.randint(1, 39 - len(prompt[:38] or [1])))
      live.append(n)
      n += 1
    if live and rng.random() < 0.1:
      s.finish(live.pop(rng.randrange(len(live))))
    run(s, stats)
    for sid in list(live):
      seq = s.get(sid)
      assert len(seq.tokens) <= seq.max_len
      if len(seq.tokens) == seq.max_len:
        s.finish(sid)
        live.remove(sid)
    for sid in s.running_ids():  # no page held past the tokens + the drafts it may verify
      seq = s.get(sid)
      assert len(s.pool.table(sid)) <= -(-(len(seq.tokens) + 3) // PS)
  assert s.num_running == s.num_waiting == 0
  assert s.pool.num_used == 0 and s.pool.num_free == s.pool.capacity
  s.check()
  assert stats["drafts"] > 1000 and 0 < stats["accepted"] < stats["drafts"]
  assert s.num_preemptions > 0


def whole_sequence_rule(seq):
  """Depends on every token read back through the pages, yet repeats often (drafts hit)."""
  return seq[-4] if len(seq) >= 4 and sum(seq) % 5 else (sum((i + 1) * t for i, t in
                                                               enumerate(seq)) * 31) % 258


@pytest.fixture
def service():
  services = []

  def make(engine=None, **config):
    engine = engine or MockEngine(mock_spec(extend=EXTEND, verify=(5,)),
                                  next_token=whole_sequence_rule)
    svc = GenerationService(engine, config=ServiceConfig(max_waiting=1000, **config)).start()
    services.append(svc)
    return svc

  yield make
  for svc in services:
    svc.stop(drain=False)
    st = svc.stats()
    assert st["running"] == st["waiting"] == st["kv_pages_used"] == 0, st


def submit_all(svc, cases):
  streams = []
  for prompt, sampling in cases:
    s = Stream()
    svc.submit(GenerationRequest(prompt, sampling), s)
    streams.append(s)
  for s in streams:
    s.wait()
  return [(s.tokens, s.data, s.reason, [e.index for e in s.events]) for s in streams]


def test_streams_equal_plain_decoding_with_eos_stop_and_max_tokens(service):
  """Same tokens, text, finish reasons and event indices; a stop string or EOS inside an
  accepted run of drafts ends the stream there."""
  rng = random.Random(1)
  cases = []
  for i in range(60):
    prompt = bytes(rng.choice(b"abcab ") for _ in range(rng.randint(1, 30)))
    cases.append((prompt, SamplingParams(
        max_new_tokens=rng.randint(1, 30), stop=(b"ca",) if i % 3 == 0 else (),
        ignore_eos=i % 2 == 0)))
  plain = submit_all(service(), cases)
  spec_svc = service(speculative=SpeculativeConfig(num_tokens=4))
  assert submit_all(spec_svc, cases) == plain
  st = spec_svc.stats()
  assert st["spec_accepted_tokens"] > 100 and st["spec_draft_tokens"] > st["spec_accepted_tokens"]
  assert {r for _, _, r, _ in plain} == {FinishReason.STOP, FinishReason.LENGTH}
  assert st["preemptions"] > 0  # pages ran out: drafts dropped, then the youngest preempted
  calls = spec_svc.engine.calls
  assert any(c.kind == "verify" for c in calls) and st["decode_steps"] < st["tokens_generated"]


def test_cancel_while_speculating_frees_everything(service):
  engine = MockEngine(mock_spec(extend=EXTEND, verify=(5,)), next_token=lambda s: s[-2],
                      delay_s=0.002)
  svc = service(engine, speculative=SpeculativeConfig(num_tokens=4))
  s = Stream()
  handle = svc.submit(GenerationRequest(b"abab", SamplingParams(max_new_tokens=59,
                                                                ignore_eos=True)), s)
  while len(s.tokens) < 6:
    pass
  handle.cancel()
  assert s.wait().finish_reason is FinishReason.CANCELLED and len(s.tokens) < 59


def test_metrics_name_drafts_and_acceptance(service):
  svc = service(speculative=SpeculativeConfig(num_tokens=4))
  submit_all(svc, [(b"abcabcabc", SamplingParams(max_new_tokens=20, ignore_eos=True))])
  fams = {f.name: f for f in GenerationCollector(lambda: [("lm", svc)]).collect()}
  st = svc.stats()
  value = lambda name: fams[name].samples[0].value  # noqa: E731
  assert value("vllm:spec_decode_num_draft_tokens") == st["spec_draft_tokens"] > 0
  assert value("vllm:spec_decode_num_accepted_tokens") == st["spec_accepted_tokens"] > 0
  assert value("vllm:spec_decode_draft_acceptance_rate") == pytest.approx(
      st["spec_accepted_tokens"] / st["spec_draft_tokens"])


def test_refusals_say_what_to_change():
  spec = SpeculativeConfig(num_tokens=4)
  with pytest.raises(BundleError, match="verify_<C> signatures"):
    GenerationService(MockEngine(mock_spec(extend=EXTEND)), config=ServiceConfig(speculative=spec))
  with pytest.raises(BundleError, match="chunked prefill"):
    GenerationService(MockEngine(mock_spec(extend=EXTEND, verify=(5,))),
                      config=ServiceConfig(speculative=spec, chunked_prefill=False))
  with pytest.raises(BundleError, match="C >= 6"):
    GenerationService(MockEngine(mock_spec(extend=EXTEND, verify=(3, 5))),
                      config=ServiceConfig(speculative=SpeculativeConfig(num_tokens=5)))
  with pytest.raises(ValueError, match="method"):
    SpeculativeConfig(method="eagle")


def test_each_step_uses_the_smallest_verify_shape_that_holds_its_drafts(service):
  engine = MockEngine(mock_spec(extend=EXTEND, verify=(3, 5, 9)), next_token=whole_sequence_rule)
  svc = service(engine, speculative=SpeculativeConfig(num_tokens=4))
  cases = [(b"abcab cabc" * i, SamplingParams(max_new_tokens=20)) for i in range(1, 5)]
  assert submit_all(svc, cases) == submit_all(service(), cases)
  lengths = {c.length for c in engine.calls if c.kind == "verify"}
  assert lengths == {3, 5}  # never 9: K = 4 needs 5


@pytest.mark.parametrize("same", [True, False])
def test_a_draft_model_gives_plain_decodings_streams(service, same):
  """A draft engine (the target's rule, or one that differs from it now and then): the same
  streams as plain decoding; the target's own rule as draft is accepted every time."""
  def other(seq):
    return whole_sequence_rule(seq) if len(seq) % 3 else (seq[-1] + 1) % 256

  draft = MockEngine(mock_spec(extend=EXTEND, verify=(5,)),
                     next_token=whole_sequence_rule if same else other)
  engine = MockEngine(mock_spec(extend=EXTEND, verify=(5,)), next_token=whole_sequence_rule)
  svc = GenerationService(engine, config=ServiceConfig(
      max_waiting=1000, speculative=SpeculativeConfig(method="draft", num_tokens=4)),
                          draft=draft).start()
  rng = random.Random(2)
  cases = [(bytes(rng.choice(b"abc ") for _ in range(rng.randint(1, 30))),
            SamplingParams(max_new_tokens=rng.randint(1, 25), ignore_eos=i % 2 == 0))
           for i in range(40)]
  try:
    got = submit_all(svc, cases)
    st = svc.stats()
  finally:
    svc.stop()
  assert got == submit_all(service(), cases)
  assert st["kv_pages_used"] == 0 and st["spec_draft_tokens"] > 100
  if same:
    assert st["spec_accepted_tokens"] == st["spec_draft_tokens"]
  else:
    assert 0 < st["spec_accepted_tokens"] < st["spec_draft_tokens"]
  assert {c.kind for c in draft.calls} == {"extend", "decode"}  # mirrors chunks, drafts by decode


def test_draft_method_and_draft_engine_go_together():
  engine = MockEngine(mock_spec(extend=EXTEND, verify=(5,)))
  with pytest.raises(BundleError, match="needs a draft model"):
    GenerationService(engine, config=ServiceConfig(speculative=SpeculativeConfig(method="draft")))
  with pytest.raises(BundleError, match="page_size"):
    GenerationService(engine, config=ServiceConfig(speculative=SpeculativeConfig(method="draft")),
                      draft=MockEngine(mock_spec(extend=EXTEND, verify=(5,), page_size=8)))


def test_the_draft_model_is_the_newest_version_of_its_name_in_the_repository(tmp_path):
  from serving.kinds import draft_path
  from serving.repository import ModelServingConfig

  for v in ("1", "3", "12", "notes"):
    (tmp_path / "draft_lm" / v).mkdir(parents=True)
  assert draft_path(tmp_path / "lm" / "1", "draft_lm") == tmp_path / "draft_lm" / "12"
  assert draft_path(tmp_path / "lm" / "1", None) is None
  with pytest.raises(BundleError, match="no version folder"):
    draft_path(tmp_path / "lm" / "1", "missing")
  with pytest.raises(ValueError, match="go together"):
    ModelServingConfig(speculative="draft")
  assert ModelServingConfig.from_json({"speculative": "draft", "speculative_model": "d"})
