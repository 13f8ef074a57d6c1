"""GenerationService over MockEngine: exact streams, stops, cancels, failures, drains, accounting."""

from __future__ import annotations

import random
import threading
import time

import pytest

from genutil import Stream
from serving.generation.mock_engine import MockEngine, mock_spec
from serving.generation.request import FinishReason, GenerationRequest, SamplingParams
from serving.generation.service import GenerationService, ServiceConfig
from serving.types import Code, ServingError

EOS = 257


def request(prompt, **kw) -> GenerationRequest:
  return GenerationRequest(prompt, SamplingParams(**kw))


@pytest.fixture
def service():
  services = []

  def make(engine=None, **config):
    svc = GenerationService(engine or MockEngine(), config=ServiceConfig(**config)).start()
    services.append(svc)
    return svc

  yield make
  for svc in services:
    svc.stop(drain=False)


def wait_idle(svc: GenerationService) -> dict[str, float]:
  """The stats once nothing runs, waits or holds a KV page (AssertionError after 5 s)."""
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline:
    st = svc.stats()
    if st["running"] == st["waiting"] == st["kv_pages_used"] == 0:
      return st
    time.sleep(0.005)
  raise AssertionError(f"service did not go idle: {svc.stats()}")


def assert_idle(svc: GenerationService) -> None:
  """Idle with nothing leaked: no page held, and a full house of fresh requests (one per decode
  slot) still runs to its length (a leaked slot or page would leave one waiting forever)."""
  st = wait_idle(svc)
  assert st["kv_pages_total"] > 0 and st["kv_cache_usage"] == 0.0
  probes = [Stream() for _ in range(int(st["decode_slots"]))]
  for s in probes:
    svc.submit(request("a", max_new_tokens=3, ignore_eos=True), s)
  for s in probes:
    assert s.wait(10).finish_reason is FinishReason.LENGTH and len(s.tokens) == 3
  wait_idle(svc)


def test_stream_is_exact_and_ends_on_length(service):
  svc = service()
  s = Stream()
  svc.submit(request("a", max_new_tokens=5), s)
  final = s.wait()
  assert s.data == b"bcdef" and s.text == "bcdef"
  assert [e.index for e in s.events] == [0, 1, 2, 3, 4]
  assert [e.finished for e in s.events] == [False] * 4 + [True]
  assert final.finish_reason is FinishReason.LENGTH and final.error is None
  m = final.metrics
  assert (m.prompt_tokens, m.generated_tokens, m.preemptions) == (2, 5, 0)  # BOS + "a"
  assert 0 <= m.queue_s <= m.ttft_s <= m.total_s and m.tpot_s >= 0
  assert_idle(svc)


def test_stop_sequence_is_cut_across_tokens(service):
  svc = service()
  s = Stream()
  svc.submit(request("a", max_new_tokens=20, stop=("ef", "zz")), s)
  assert s.wait().finish_reason is FinishReason.STOP
  assert s.data == b"bcd"
  assert s.events[-1].token_id == ord("f")  # the token that completed the match
  # "e" was held back (it might start "ef"), so its event released nothing.
  assert [e.piece for e in s.events] == [b"b", b"c", b"d", b"", b""]


def test_held_back_bytes_are_released_at_length_limit(service):
  svc = service()
  s = Stream()
  svc.submit(request("a", max_new_tokens=3, stop=("dX",)), s)
  assert s.wait().finish_reason is FinishReason.LENGTH
  assert s.data == b"bcd" and s.events[-1].piece == b"d"


def test_eos_stops_unless_ignored(service):
  eos_after_c = lambda seq: EOS if seq[-1] == ord("c") else (seq[-1] + 1) % 256  # noqa: E731
  svc = service(MockEngine(next_token=eos_after_c))
  s, t = Stream(), Stream()
  svc.submit(request("a", max_new_tokens=10), s)
  svc.submit(request("a", max_new_tokens=4, ignore_eos=True), t)
  assert s.wait().finish_reason is FinishReason.STOP
  assert s.tokens == [ord("b"), ord("c"), EOS] and s.data == b"bc"
  assert t.wait().finish_reason is FinishReason.LENGTH
  assert t.tokens == [ord("b"), ord("c"), EOS, 2] and t.data == b"bc\x02"  # (257 + 1) % 256


def test_utf8_text_waits_for_whole_characters(service):
  euro = "€".encode()
  nxt = {0x41: euro[0], euro[0]: euro[1], euro[1]: euro[2], euro[2]: 0x21}
  svc = service(MockEngine(next_token=lambda seq: nxt.get(seq[-1], 0x21)))
  s = Stream()
  svc.submit(request("A", max_new_tokens=4), s)
  s.wait()
  assert [e.text for e in s.events] == ["", "", "€", "!"] and s.text == "€!"


def test_refusals_are_synchronous(service):
  svc = service(max_waiting=2)
  with pytest.raises(ServingError) as e:
    svc.submit(request("x" * 64), Stream())  # BOS + 64 >= max_seq_len 64
  assert e.value.code is Code.INVALID_ARGUMENT
  with pytest.raises(ServingError) as e:
    GenerationService(MockEngine(mock_spec(num_pages=5))).start().submit(
        request("x" * 10, max_new_tokens=20), Stream())
  assert e.value.code is Code.RESOURCE_EXHAUSTED
  assert svc.stats()["requests_refused"] == 1


def test_queue_full_is_resource_exhausted():
  svc = GenerationService(MockEngine(delay_s=0.05), config=ServiceConfig(max_waiting=2)).start()
  accepted = []
  with pytest.raises(ServingError) as e:
    for _ in range(50):  # the loop admits one prefill per 0.1 s step: the queue fills
      s = Stream()
      svc.submit(request("a", max_new_tokens=50), s)
      accepted.append(s)
  assert e.value.code is Code.RESOURCE_EXHAUSTED and 2 <= len(accepted) < 50
  svc.stop(drain=False)
  assert all(s.wait().finished for s in accepted)
  assert svc.stats()["requests_refused"] == 1


def test_duplicate_request_id_is_refused(service):
  svc = service(MockEngine(delay_s=0.02))
  svc.submit(GenerationRequest("a", SamplingParams(max_new_tokens=50), request_id="r1"), Stream())
  with pytest.raises(ServingError, match="already live"):
    svc.submit(GenerationRequest("a", request_id="r1"), Stream())


def test_cancel_running_and_waiting_frees_everything(service):
  svc = service(MockEngine(mock_spec(decode_batch=1), delay_s=0.005))
  running, waiting = Stream(), Stream()
  h1 = svc.submit(request("a", max_new_tokens=60), running)
  h2 = svc.submit(request("b", max_new_tokens=60), waiting)
  while not running.events:
    time.sleep(0.001)
  assert h2.cancel() and h1.cancel()
  assert not h1.cancel()  # already gone
  assert running.wait().finish_reason is FinishReason.CANCELLED
  assert waiting.wait().finish_reason is FinishReason.CANCELLED
  assert waiting.tokens == [] and waiting.events[-1].metrics.ttft_s is None
  assert_idle(svc)
  assert svc.stats()["requests_cancelled"] == 2


def test_engine_failure_fails_running_requests_then_recovers(service):
  fail = {"on": True}
  engine = MockEngine(fail=lambda kind, seq: fail["on"] and kind == "decode" and len(seq) > 4)
  svc = service(engine)
  streams = [Stream() for _ in range(3)]
  for s in streams:
    svc.submit(request("a", max_new_tokens=10), s)
  for s in streams:
    final = s.wait()
    assert final.finish_reason is FinishReason.ERROR and final.error.code is Code.INTERNAL
  fail["on"] = False
  ok = Stream()
  svc.submit(request("a", max_new_tokens=5), ok)
  assert ok.wait().finish_reason is FinishReason.LENGTH and ok.data == b"bcdef"
  assert_idle(svc)
  assert svc.stats()["engine_failures"] >= 1 and svc.stats()["requests_failed"] == 3


def test_a_raising_callback_cancels_only_its_request(service):
  svc = service()

  def bad(event):
    raise RuntimeError("client went away")

  good = Stream()
  svc.submit(request("a", max_new_tokens=30), bad)
  svc.submit(request("a", max_new_tokens=5), good)
  assert good.wait().finish_reason is FinishReason.LENGTH and good.data == b"bcdef"
  assert_idle(svc)
  assert svc.stats()["requests_cancelled"] == 1


def test_stop_drains_then_refuses():
  svc = GenerationService(MockEngine(delay_s=0.001)).start()
  streams = [Stream() for _ in range(10)]
  for s in streams:
    svc.submit(request("a", max_new_tokens=8), s)
  svc.stop()
  assert all(s.done.is_set() and s.reason is FinishReason.LENGTH for s in streams)
  with pytest.raises(ServingError) as e:
    svc.submit(request("a"), Stream())
  assert e.value.code is Code.UNAVAILABLE


def test_stop_without_drain_cancels():
  svc = GenerationService(MockEngine(delay_s=0.01)).start()
  streams = [Stream() for _ in range(6)]
  for s in streams:
    svc.submit(request("a", max_new_tokens=60), s)
  svc.stop(drain=False)
  assert all(s.reason is FinishReason.CANCELLED for s in streams)
  assert svc.stats()["kv_pages_used"] == 0


def test_static_batching_never_prefills_while_decoding(service):
  engine = MockEngine(delay_s=0.002)
  svc = service(engine, static_batching=True)
  streams = [Stream() for _ in range(9)]
  for i, s in enumerate(streams):
    svc.submit(request("a", max_new_tokens=2 + i), s)
  for s in streams:
    s.wait()
  # Between prefills the decode batch only shrinks: nobody joins a running batch.
  epochs, rows = [], None
  for call in engine.calls:
    if call.kind == "prefill":
      rows = None
    elif rows is None:
      rows = [call.rows]
      epochs.append(rows)
    else:
      rows.append(call.rows)
  assert all(r == sorted(r, reverse=True) for r in epochs), epochs
  assert max(max(r) for r in epochs) == 4 and len(epochs) >= 3


def test_continuous_batching_admits_into_freed_slots(service):
  engine = MockEngine(delay_s=0.002)  # sleeping like a device lets the submits through
  svc = service(engine)
  long, shorts = Stream(), [Stream() for _ in range(6)]
  svc.submit(request("a", max_new_tokens=40), long)
  for s in shorts:
    svc.submit(request("a", max_new_tokens=3), s)
  long.wait()
  assert all(s.wait().finish_reason is FinishReason.LENGTH for s in shorts)
  # The short ones came and went while the long one kept decoding: never a decode of 1 row
  # followed by a prefill only after the long one finished.
  kinds = [c.kind for c in engine.calls]
  last_prefill = max(i for i, k in enumerate(kinds) if k == "prefill")
  assert last_prefill < len(kinds) - 10


def full_sequence_rule(seq):
  """Next token depends on the whole sequence, so any page mix-up shows."""
  return (sum(seq) * 31 + len(seq) * 7) % 256


def expected_tokens(prompt: list[int], n: int) -> list[int]:
  seq, out = list(prompt), []
  for _ in range(n):
    out.append(full_sequence_rule(seq))
    seq.append(out[-1])
  return out


def test_hundreds_of_random_requests_exact_and_no_leak(service):
  """Random prompts, lengths and cancels through a small cache: exact outputs, zero leaks."""
  rng = random.Random(7)
  engine = MockEngine(mock_spec(num_pages=21, decode_batch=4), next_token=full_sequence_rule,
                      delay_s=0.0002)
  svc = service(engine, max_waiting=1000)
  jobs = []
  for _ in range(400):
    prompt = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    n = rng.randint(1, 23)
    s = Stream()
    h = svc.submit(request(prompt, max_new_tokens=n), s)
    jobs.append((prompt, n, s, h))
    if rng.random() < 0.2:
      rng.choice(jobs)[3].cancel()
  cancelled = 0
  for prompt, n, s, _ in jobs:
    final = s.wait()
    want = expected_tokens([256, *prompt], min(n, 64 - 1 - len(prompt)))
    if final.finish_reason is FinishReason.CANCELLED:
      cancelled += 1
      assert s.tokens == want[:len(s.tokens)]
    else:
      assert final.finish_reason is FinishReason.LENGTH
      assert s.tokens == want
  assert_idle(svc)
  st = svc.stats()
  assert cancelled > 20 and st["preemptions"] > 0, st
  assert st["tokens_generated"] >= sum(len(j[2].tokens) for j in jobs)


def test_submit_and_cancel_from_many_threads(service):
  svc = service(MockEngine(delay_s=0.0005), max_waiting=1000)
  streams: list[Stream] = []
  lock = threading.Lock()

  def client(seed):
    rng = random.Random(seed)
    for _ in range(30):
      s = Stream()
      h = svc.submit(request("a", max_new_tokens=rng.randint(1, 20)), s)
      with lock:
        streams.append(s)
      if rng.random() < 0.3:
        h.cancel()

  threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(s.wait().finished for s in streams) and len(streams) == 120
  assert_idle(svc)


def test_stats_shape(service):
  svc = service()
  st = svc.stats()
  for key in ("running", "waiting", "kv_pages_used", "kv_pages_total", "kv_cache_usage",
              "requests_submitted", "tokens_generated", "ttft_seconds_sum", "ttft_count",
              "tpot_seconds_sum", "tpot_count", "preemptions", "decode_slots"):
    assert isinstance(st[key], (int, float)), key
  assert st["kv_pages_total"] == 32 and st["decode_slots"] == 4
