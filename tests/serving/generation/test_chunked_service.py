"""GenerationService with chunked prefill and prefix caching over MockEngine: exact and leak-free."""

from __future__ import annotations

import random
import time

import pytest

from genutil import Stream
from serving.generation.metrics import GenerationCollector
from serving.generation.mock_engine import MockEngine, mock_spec
from serving.generation.request import FinishReason, GenerationRequest, SamplingParams
from serving.generation.service import GenerationService, ServiceConfig

EXTEND = ((4, 4), (8, 2), (16, 1))


def whole_sequence_rule(seq):
  """Next token depends on every token read back through the pages, so a wrong page shows."""
  return (sum((i + 1) * t for i, t in enumerate(seq)) * 31 + len(seq)) % 256


def expected(prompt: bytes, n: int) -> list[int]:
  seq, out = [256, *prompt], []
  for _ in range(n):
    out.append(whole_sequence_rule(seq))
    seq.append(out[-1])
  return out


@pytest.fixture
def service():
  services = []

  def make(engine=None, **config):
    engine = engine or MockEngine(mock_spec(extend=EXTEND), next_token=whole_sequence_rule)
    svc = GenerationService(engine, config=ServiceConfig(max_waiting=1000, **config)).start()
    services.append(svc)
    return svc

  yield make
  for svc in services:
    svc.stop(drain=False)


def wait_idle(svc: GenerationService) -> dict[str, float]:
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline:
    st = svc.stats()
    if st["running"] == st["waiting"] == st["kv_pages_used"] == 0:
      return st
    time.sleep(0.005)
  raise AssertionError(f"service did not go idle: {svc.stats()}")


def test_a_long_prompt_never_stalls_running_decodes(service):
  engine = MockEngine(mock_spec(extend=EXTEND), next_token=whole_sequence_rule, delay_s=0.001)
  svc = service(engine, max_num_batched_tokens=8)
  running = Stream()
  svc.submit(GenerationRequest(b"ab", SamplingParams(max_new_tokens=30, ignore_eos=True)),
             running)
  while not running.tokens:
    time.sleep(0.001)
  long = Stream()
  svc.submit(GenerationRequest(b"x" * 50, SamplingParams(max_new_tokens=3)), long)
  assert long.wait().finish_reason is FinishReason.LENGTH
  assert running.wait().finish_reason is FinishReason.LENGTH
  assert running.tokens == expected(b"ab", 30) and long.tokens == expected(b"x" * 50, 3)
  calls = engine.calls
  ext = [i for i, c in enumerate(calls) if c.kind == "extend"][1:]  # the long prompt's chunks
  assert len(ext) >= 7  # 51 prompt tokens, at most 7 per step beside the running decode
  # Between two chunks of the long prompt there is always a decode of the running one.
  for a, b in zip(ext, ext[1:]):
    assert any(c.kind == "decode" for c in calls[a:b]), calls[a:b + 1]
  assert all(c.tokens <= 8 for c in calls)
  st = wait_idle(svc)
  assert st["prefill_tokens"] == 3 + 51


def test_a_shared_prefix_is_prefilled_once(service):
  engine = MockEngine(mock_spec(extend=EXTEND), next_token=whole_sequence_rule)
  svc = service(engine)
  instruction = b"Write an ad for: "  # 17 bytes + BOS = 18 tokens: 4 full pages of 4
  first = Stream()
  svc.submit(GenerationRequest(instruction + b"shoes", SamplingParams(max_new_tokens=4)), first)
  first.wait()
  before = svc.stats()
  streams = {}
  for product in (b"tea", b"socks", b"lamps"):
    s = streams[product] = Stream()
    svc.submit(GenerationRequest(instruction + product, SamplingParams(max_new_tokens=4)), s)
  for product, s in streams.items():
    assert s.wait().finish_reason is FinishReason.LENGTH
    assert s.tokens == expected(instruction + product, 4)
  st = wait_idle(svc)
  assert st["prefill_tokens"] - before["prefill_tokens"] == sum(
      18 + len(p) - 16 for p in streams)  # only the tokens after the 4 cached pages
  assert st["prefix_cache_hits"] - before["prefix_cache_hits"] == 3 * 16
  assert st["prefix_cache_queries"] == 4 * 18 + 5 + 3 + 5 + 5
  metrics = {m.name: m for m in GenerationCollector(lambda: [("lm", svc)]).collect()}
  hits = metrics["vllm:prefix_cache_hits"].samples[0]
  assert hits.value == st["prefix_cache_hits"] and hits.labels == {"model_name": "lm"}


def test_without_prefix_caching_nothing_is_shared(service):
  svc = service(prefix_caching=False)
  for product in (b"tea", b"socks"):
    s = Stream()
    svc.submit(GenerationRequest(b"Write an ad for: " + product,
                                 SamplingParams(max_new_tokens=2)), s)
    s.wait()
    assert s.tokens == expected(b"Write an ad for: " + product, 2)
  st = wait_idle(svc)
  assert st["prefix_cache_hits"] == 0 and st["prefill_tokens"] == 21 + 23


def test_whole_prefill_when_chunking_is_off_or_the_bundle_has_no_extend(service):
  for svc, engine in ((service(engine := MockEngine(mock_spec(extend=EXTEND)),
                               chunked_prefill=False), engine),
                      (service(engine2 := MockEngine(mock_spec())), engine2)):
    s = Stream()
    svc.submit(GenerationRequest(b"x" * 40, SamplingParams(max_new_tokens=2)), s)
    assert s.wait().finish_reason is FinishReason.LENGTH
    assert "extend" not in {c.kind for c in engine.calls}


def test_hundreds_of_random_shared_prefix_requests_exact_and_no_leak(service):
  """Random prompts over a few shared prefixes, cancels, a small cache (so pages are evicted and
  sequences preempted): every stream exact, every page free at the end."""
  rng = random.Random(11)
  engine = MockEngine(mock_spec(num_pages=21, extend=EXTEND), next_token=whole_sequence_rule,
                      delay_s=0.0002)
  svc = service(engine)
  prefixes = [bytes(rng.randrange(256) for _ in range(rng.randint(8, 30))) for _ in range(4)]
  jobs = []
  for _ in range(300):
    prompt = rng.choice(prefixes)[:rng.randint(1, 30)] + bytes(
        rng.randrange(256) for _ in range(rng.randint(0, 8)))
    n = rng.randint(1, 20)
    s = Stream()
    jobs.append((prompt, n, s, svc.submit(GenerationRequest(prompt, SamplingParams(
        max_new_tokens=n, ignore_eos=True)), s)))
    if rng.random() < 0.2:
      rng.choice(jobs)[3].cancel()
  cancelled = 0
  for prompt, n, s, _ in jobs:
    final = s.wait()
    want = expected(prompt, min(n, 64 - 1 - len(prompt)))
    if final.finish_reason is FinishReason.CANCELLED:
      cancelled += 1
      assert s.tokens == want[:len(s.tokens)]
    else:
      assert s.tokens == want
  st = wait_idle(svc)
  assert cancelled > 20 and st["preemptions"] > 0 and st["prefix_cache_hits"] > 500, st
  probes = [Stream() for _ in range(int(st["decode_slots"]))]  # no slot or page leaked
  for s in probes:
    svc.submit(GenerationRequest(b"probe", SamplingParams(max_new_tokens=3, ignore_eos=True)), s)
  assert [s.wait().finish_reason for s in probes] == [FinishReason.LENGTH] * len(probes)
  assert [len(s.tokens) for s in probes] == [3] * len(probes)


def test_engine_failure_forgets_the_cached_prefixes(service):
  fail = {"on": False}
  engine = MockEngine(mock_spec(extend=EXTEND), next_token=whole_sequence_rule,
                      fail=lambda kind, seq: fail["on"] and kind == "extend")
  svc = service(engine)
  s = Stream()
  svc.submit(GenerationRequest(b"a shared prefix!", SamplingParams(max_new_tokens=2)), s)
  s.wait()
  assert svc.stats()["prefix_cache_pages"] > 0
  fail["on"] = True
  s = Stream()
  svc.submit(GenerationRequest(b"a shared prefix?", SamplingParams(max_new_tokens=2)), s)
  assert s.wait().finish_reason is FinishReason.ERROR
  fail["on"] = False
  assert svc.stats()["prefix_cache_pages"] == 0  # the reset cache holds no prefix any more
  s = Stream()
  svc.submit(GenerationRequest(b"a shared prefix.", SamplingParams(max_new_tokens=2)), s)
  s.wait()
  assert s.tokens == expected(b"a shared prefix.", 2)
  wait_idle(svc)


def test_flags_and_config_json_set_the_generation_policy(capsys):
  from serving import cli
  from serving.repository import ModelServingConfig

  args = cli.build_parser().parse_args(["serve", "--no-prefix-caching",
                                        "--max-num-batched-tokens", "24"])
  cfg = cli.server_config(args, "/tmp", None).default_model_config
  assert (cfg.chunked_prefill, cfg.max_num_batched_tokens, cfg.prefix_caching) == (True, 24, False)
  per_model = ModelServingConfig.from_json({"chunked_prefill": False}, cfg)
  assert (per_model.chunked_prefill, per_model.max_num_batched_tokens) == (False, 24)
  with pytest.raises(ValueError, match="max_num_batched_tokens"):
    ModelServingConfig(max_num_batched_tokens=0)
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(["serve", "--help"])
  help_text = capsys.readouterr().out
  for flag in ("--chunked-prefill", "--no-chunked-prefill", "--max-num-batched-tokens",
               "--no-prefix-caching"):
    assert flag in help_text


def test_a_budget_below_the_decode_batch_is_refused():
  with pytest.raises(ValueError, match="decode_batch"):
    GenerationService(MockEngine(mock_spec(extend=EXTEND)),
                      config=ServiceConfig(max_num_batched_tokens=3))
