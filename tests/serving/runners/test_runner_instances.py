"""Model instances (Triton's instance_group count): several batches of one model at once."""

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import assert_served_like
from serving.batching import BatchingConfig
from serving.engines.mock import MockEngine
from serving.repository import ModelServingConfig
from serving.runners import ModelRunner
from serving.types import InferRequest
from servingutil import expected, mock_reference, mock_rows, wait_until


class GatedEngine(MockEngine):
  """MockEngine whose `fetch` waits for `gate`: a dispatched batch stays in flight until then."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.gate = threading.Event()
    self.waiting = 0  # fetches blocked on the gate
    self.count_lock = threading.Lock()  # instances fetch concurrently

  def fetch(self, handle):
    with self.count_lock:
      self.waiting += 1
    assert self.gate.wait(10), "gate never opened"
    return super().fetch(handle)


class _EventSink:
  """Answers each request through its (callback, done event) token."""

  def complete(self, completions):
    for req, out, err in completions:
      on_done, _ = req.sink_token
      on_done(out, err)


_SINK = _EventSink()


def _request(rows: int, seed: int, answers: dict) -> InferRequest:
  x, k = mock_rows(np.random.default_rng(seed), rows)
  done = threading.Event()

  def on_done(out, err):
    answers.setdefault(seed, []).append((x, k, out, err))
    done.set()

  return InferRequest({"x": x, "k": k}, rows, _SINK, time.perf_counter(), sink_token=(on_done, done))


def _check(answers: dict, n: int) -> None:
  assert sorted(answers) == list(range(n))
  for seed, got in answers.items():
    assert len(got) == 1, f"request {seed} answered {len(got)} times"
    x, k, out, err = got[0]
    assert err is None
    y, z = expected(x, k)
    np.testing.assert_array_equal(out["y"], y)
    np.testing.assert_array_equal(out["z"], z)


@pytest.mark.parametrize("instances", [1, 2])
def test_extra_instances_run_full_batches_while_one_is_in_flight(instances):
  eng = GatedEngine(buckets=(1, 2, 4, 8))
  runner = ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=instances)
  runner.start()
  answers: dict = {}
  try:
    reqs = [_request(n, i, answers) for i, n in enumerate((1, 1, 4, 4))]
    runner.submit(reqs[0])
    assert wait_until(lambda: eng.waiting == 1)  # the primary holds batch 1 in flight
    runner.submit(reqs[1])
    time.sleep(0.05)
    assert eng.batches == [1]  # a partial batch waits for the primary, whatever the instances
    runner.submit(reqs[2])
    runner.submit(reqs[3])  # 9 rows queued: a full batch (8)
    if instances == 2:
      assert wait_until(lambda: eng.waiting == 2)  # the second instance runs it meanwhile
      assert eng.batches == [1, 8]
    else:
      time.sleep(0.05)
      assert eng.batches == [1]
    eng.gate.set()
    for r in reqs:
      assert r.sink_token[1].wait(5)
  finally:
    eng.gate.set()
    runner.stop()
  _check(answers, 4)
  assert runner.stats.success_count == 4 and runner.stats.inference_count == 10


class GateFirstEngine(GatedEngine):
  """Only the first batch waits for the gate: later batches overtake it."""

  def fetch(self, handle):
    with self.count_lock:
      first = self.waiting == 0
    if first:
      return super().fetch(handle)
    return MockEngine.fetch(self, handle)


def test_split_request_is_delivered_once_all_its_slices_finish_in_any_order():
  eng = GateFirstEngine(buckets=(1, 2, 4))
  runner = ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=2)
  runner.start()
  answers: dict = {}
  try:
    req = _request(12, 0, answers)  # three full batches: rows 0-3, 4-7, 8-11
    runner.submit(req)
    # The primary holds rows 0-3; the second instance runs 4-7 and then the last slice, 8-11.
    assert wait_until(lambda: len(eng.batches) == 3 and eng.waiting == 1)
    time.sleep(0.05)
    assert not req.sink_token[1].is_set()  # not answered before rows 0-3 are in
    eng.gate.set()
    assert req.sink_token[1].wait(5)
  finally:
    eng.gate.set()
    runner.stop()
  _check(answers, 1)


def _worker_threads(name: str) -> list[str]:
  """Names of the live batch (dispatch) threads of runner `name`, one per instance: named
  `runner-<name>#<instance>` (a queued runner's completion threads end in `-out`)."""
  return sorted(t.name for t in threading.enumerate()
                if t.name.startswith(f"runner-{name}#") and not t.name.endswith("-out"))


def test_concurrent_instances_answer_every_request_exactly_once():
  eng = MockEngine(buckets=(1, 2, 4, 8, 16), delay_s=0.001)
  runner = ModelRunner("three", eng, BatchingConfig(buckets=eng.buckets), instances=3)
  assert runner.capabilities.instances == 3
  assert _worker_threads("three") == []  # nothing runs before start
  runner.start()
  assert _worker_threads("three") == ["runner-three#0", "runner-three#1", "runner-three#2"]
  answers: dict = {}
  sizes = np.random.default_rng(0).integers(1, 40, size=120)  # some split across batches
  reqs = [_request(int(n), i, answers) for i, n in enumerate(sizes)]

  def client(part):
    for r in part:
      runner.submit(r)

  threads = [threading.Thread(target=client, args=(reqs[i::4],)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  for r in reqs:
    assert r.sink_token[1].wait(10)
  runner.stop()
  _check(answers, len(reqs))
  st = runner.stats
  assert st.success_count == len(reqs) and st.inference_count == int(sizes.sum())
  assert sum(st.batch_counts.values()) == st.execution_count == len(eng.batches)
  assert _worker_threads("three") == []  # stop joined every instance


def test_instance_count_is_validated():
  eng = MockEngine()
  with pytest.raises(ValueError, match="instance_count"):
    ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=0)
  eng.max_instances = 1  # e.g. multi-host lockstep: one batch at a time on every process
  with pytest.raises(ValueError, match="instance_count must be between 1 and 1"):
    ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets), instances=2)
  assert ModelRunner("m", eng, BatchingConfig(buckets=eng.buckets)).capabilities.instances == 1
  with pytest.raises(ValueError, match="instance_count must be >= 1"):
    ModelServingConfig(instance_count=0)
  assert ModelServingConfig.from_json({"instance_count": 3}).instance_count == 3


def test_config_json_instance_count_is_served_and_reported(start_mock_server):
  bg, engines = start_mock_server(config={"instance_count": 2})
  c = tc.InferenceServerClient(bg.address)
  groups = c.get_model_config("mock").config.instance_group
  assert [g.count for g in groups] == [2]
  rng = np.random.default_rng(3)
  cases = [dict(zip("xk", mock_rows(rng, n))) for n in (1, 5, 19)]  # 19: split over batches
  assert assert_served_like(c, "mock", cases, mock_reference) == 3
  assert set(engines["mock"].batches) <= {1, 2, 4, 8} and sum(engines["mock"].batches) >= 25
  runner = bg.server.repository.get("mock").runner
  assert runner.capabilities.instances == 2 and runner.name == "mock/1"
  assert _worker_threads(runner.name) == ["runner-mock/1#0", "runner-mock/1#1"]
