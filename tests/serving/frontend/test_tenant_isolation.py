"""Tenant priority and isolation against the real server: a tenant's priority orders the model's
queue (a request cannot claim better than its tenant's); a tenant flooding far over its quota
(many concurrent clients) is refused at the door and held to its quota while a polite tenant's
every call is answered correctly throughout; and every front end holds a refusal until the quota
would admit the request (bad credentials: 100 ms), so a closed-loop flood cannot spin the cores.
How much the flood slows the polite tenant is a performance figure, measured by
benchmarks/tenant_isolation.py (the flood test prints its rounds' p99s, and asserts nothing about
time)."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from serving.engines.mock import MockEngine
from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.frontend.tenants import parse_tenants
from servingutil import mock_factory, mock_request, outputs, serving

NATIVE, WHY = native_frontend.load_extension()
FRONTENDS = [pytest.param("native", marks=pytest.mark.skipif(NATIVE is None, reason=WHY)),
             "python"]
FLOODER = pathlib.Path(__file__).resolve().parents[3] / "benchmarks" / "flooder.py"
ROUNDS, CLIENTS = 4, 16  # solo and flooded phases; the flood's concurrent calls


class _Recording(MockEngine):
  """Remembers the first x value of every batch it runs (each request is tagged by its x)."""

  def __init__(self, **kw):
    super().__init__(**kw)
    self.tags: list[float] = []

  def dispatch(self, *, bucket, inputs):
    self.tags.append(float(inputs["x"][0, 0]))
    return super().dispatch(bucket=bucket, inputs=inputs)


def _rows(n: int, tag: float) -> tuple[np.ndarray, np.ndarray]:
  return np.full((n, 4), tag, np.float32), np.ones((n, 1), np.int32)


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_tenants_priority_orders_the_queue_and_caps_its_requests(mock_repo, frontend):
  tenants = parse_tenants({"tenants": [{"name": "gold", "tokens": ["tok-gold"], "priority": 1},
                                       {"name": "bronze", "tokens": ["tok-bronze"],
                                        "priority": 9}]})
  engines = {}

  def factory(path, manifest, cfg):
    engines["mock"] = _Recording(buckets=manifest.batch_buckets, delay_s=0.15)
    return engines["mock"]

  with serving(mock_repo, factory, tenants=tenants, frontend=frontend) as bg, \
      grpc.insecure_channel(bg.address) as ch, concurrent.futures.ThreadPoolExecutor(6) as pool:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)

    def send(tag, tenant, **params):
      return stub.ModelInfer(mock_request(*_rows(8, tag), **params), timeout=30,
                             metadata=(("authorization", f"Bearer tok-{tenant}"),))

    sent = [(100.0, "gold", {})]  # occupies the engine while the others queue up
    sent += [(1.0, "bronze", {}), (2.0, "bronze", {}), (3.0, "bronze", {"priority": 1})]
    sent += [(9.0, "gold", {})]  # arrives last; its tenant's priority is the highest
    futs = []
    for tag, tenant, params in sent:
      futs.append(pool.submit(send, tag, tenant, **params))
      time.sleep(0.02)
    for (tag, _, _), f in zip(sent, futs):
      np.testing.assert_array_equal(outputs(f.result())["y"], np.full((8, 1), 8 * tag + 1))
  # gold overtakes; bronze's request asking priority 1 keeps bronze's 9 (FIFO among bronze)
  assert engines["mock"].tags == [100.0, 9.0, 1.0, 2.0, 3.0]


def _p99(samples: list[float]) -> float:
  return float(np.percentile(samples, 99))


@pytest.mark.skipif(NATIVE is None, reason=WHY)
def test_a_flooding_tenant_does_not_slow_a_polite_one(mock_repo):
  quota = 50  # the flood's requests/s
  tenants = parse_tenants({"tenants": [
      {"name": "polite", "tokens": ["tok-polite"], "priority": 1},
      {"name": "flood", "tokens": ["tok-flood"], "requests_per_s": quota, "requests_burst": 10}]})
  req = mock_request(*_rows(1, 1.0))
  want = np.full((1, 1), 9.0, np.float32)  # the mock's documented y = 2 * sum(x) + 1, x = 1s
  with serving(mock_repo, mock_factory(), tenants=tenants, native_threads=2) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    md = (("authorization", "Bearer tok-polite"),)

    def measure(seconds: float) -> list[float]:
      out, end = [], time.perf_counter() + seconds
      while time.perf_counter() < end:
        t0 = time.perf_counter()
        answer = stub.ModelInfer(req, metadata=md, timeout=10)
        out.append(time.perf_counter() - t0)
        np.testing.assert_array_equal(outputs(answer)["y"], want)
      return out

    measure(0.3)  # warm
    # The flood's own client CPU is niced: its clients would run on other machines; what is
    # measured is what refusing it costs the server.
    flood = subprocess.Popen(
        ["nice", "-n", "19", sys.executable, str(FLOODER), bg.address, "tok-flood",
         req.SerializeToString().hex(), str(CLIENTS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)

    def tell(cmd: str) -> None:
      flood.stdin.write(cmd + "\n")
      flood.stdin.flush()
      assert flood.stdout.readline().strip() == "ack"

    rounds, flood_s = [], 0.0
    try:
      for _ in range(ROUNDS):  # interleaved: drift in the machine's load hits both alike
        solo = measure(0.4)
        t0 = time.perf_counter()
        tell("go")
        time.sleep(0.1)
        flooded = measure(0.4)
        rounds.append((_p99(solo), _p99(flooded), solo, flooded))
        tell("stop")
        flood_s += time.perf_counter() - t0
        time.sleep(0.1)
      tell("quit")
      counts = json.loads(flood.stdout.readline())
    finally:
      flood.kill()
      flood.wait()
  refused = counts.get("RESOURCE_EXHAUSTED", 0)
  solo = [t for r in rounds for t in r[2]]
  flooded = [t for r in rounds for t in r[3]]
  ratios = sorted(f / s for s, f, _, _ in rounds)
  median = (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
  print(f"\npolite p99 solo {_p99(solo) * 1e3:.2f} ms ({len(solo)} calls), flooded"
        f" {_p99(flooded) * 1e3:.2f} ms ({len(flooded)}); per round flooded/solo"
        f" {' '.join(f'{r:.2f}' for r in ratios)}, median {median:.2f};"
        f" flood {counts} in {flood_s:.1f}s")
  assert set(counts) <= {"OK", "RESOURCE_EXHAUSTED"}, counts
  # its quota held: a burst a round, the rate while flooding, the calls in flight at each stop
  assert counts.get("OK", 0) <= ROUNDS * (10 + CLIENTS) + quota * flood_s
  assert refused >= 5 * quota * flood_s  # it really flooded: 5x its quota or more
  assert len(flooded) >= 10 * ROUNDS  # and the polite tenant kept being answered meanwhile


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_an_over_quota_refusal_waits_for_the_quota_so_a_flood_cannot_spin(mock_repo, frontend):
  """Both gRPC front ends answer an over-quota call when its quota would admit it again (at most
  100 ms later, within half the time left before the call's deadline): a client that retries on
  the refusal is admitted, and a closed-loop flood is refused about once per refill per call in
  flight, not as fast as the cores can refuse. Status and message are those of an immediate
  refusal."""
  rate = 10  # requests/s, a burst of 1: one request per 100 ms refill
  tenants = parse_tenants({"tenants": [
      {"name": "flood", "tokens": ["tok-flood"], "requests_per_s": rate, "requests_burst": 1}]})
  req = mock_request(*_rows(1, 1.0))
  md = (("authorization", "Bearer tok-flood"),)
  with serving(mock_repo, mock_factory(), tenants=tenants, frontend=frontend) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    stub.ModelInfer(req, metadata=md, timeout=10)  # the burst's one token
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
      stub.ModelInfer(req, metadata=md, timeout=10)
    held = time.perf_counter() - t0
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.details() == "tenant 'flood' is over its quota of 10 requests/s"
    assert 0.05 < held < 5.0  # answered once a token is due (100 ms after the first call)
    stub.ModelInfer(req, metadata=md, timeout=10)  # retried at once: admitted
    # A call whose deadline comes first is refused before it, not left to time out.
    with pytest.raises(grpc.RpcError) as e:
      stub.ModelInfer(req, metadata=md, timeout=0.06)  # held 30 ms, not 100
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    # Credentials no tenant has: refused the longest hold later, as logins delay a failed one.
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
      stub.ModelInfer(req, metadata=(("authorization", "Bearer nobody"),), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert 0.09 < time.perf_counter() - t0 < 5.0

    calls, seconds = 8, 1.0
    def flood() -> dict[str, int]:
      counts, end = {}, time.perf_counter() + seconds
      while time.perf_counter() < end:
        try:
          stub.ModelInfer(req, metadata=md, timeout=10)
          code = "OK"
        except grpc.RpcError as err:
          code = err.code().name
        counts[code] = counts.get(code, 0) + 1
      return counts
    with concurrent.futures.ThreadPoolExecutor(calls) as pool:
      results = list(pool.map(lambda _: flood(), range(calls)))
  total = {k: sum(r.get(k, 0) for r in results) for k in ("OK", "RESOURCE_EXHAUSTED")}
  assert sum(total.values()) == sum(sum(r.values()) for r in results)  # nothing else came back
  assert total["OK"] <= 1 + rate * (seconds + 0.5)  # the quota held
  # Each call in flight waits about one refill (1 / rate) per answer: calls * rate * seconds in
  # all, against thousands refused at once on these cores (with slack for the last answers).
  assert sum(total.values()) <= 2 * calls * rate * seconds + calls


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_the_http_port_holds_its_refusals_too(mock_repo, frontend):
  """Unmodified tritonclient.http against the native and the Python HTTP servers: an over-quota
  request gets its 429 once the quota would admit it, and a retry right after is served;
  credentials no tenant has get their 401 100 ms later. Messages as when refused at once."""
  import tritonclient.http as th
  from tritonclient.utils import InferenceServerException

  tenants = parse_tenants({"tenants": [
      {"name": "flood", "tokens": ["tok-flood"], "requests_per_s": 10, "requests_burst": 1}]})
  x, k = _rows(1, 1.0)
  with serving(mock_repo, mock_factory(), tenants=tenants, http_port=0, frontend=frontend) as bg:
    assert bg.server.http_frontend == frontend
    client = th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}")
    inputs = [th.InferInput("x", list(x.shape), "FP32"), th.InferInput("k", list(k.shape), "INT32")]
    inputs[0].set_data_from_numpy(x, binary_data=True)
    inputs[1].set_data_from_numpy(k, binary_data=True)

    def infer(token: str) -> np.ndarray:
      return client.infer("mock", inputs, headers={"Authorization": f"Bearer {token}"}
                          ).as_numpy("y")

    def refused(token: str, status: str, message: str, least_s: float) -> None:
      t0 = time.perf_counter()
      with pytest.raises(InferenceServerException) as e:
        infer(token)
      assert e.value.status() == status and e.value.message().startswith(message), e.value
      assert least_s < time.perf_counter() - t0 < 5.0

    want = np.full((1, 1), 9.0, np.float32)  # the mock's y = 2 * sum(x) + 1, x = 1s
    np.testing.assert_array_equal(infer("tok-flood"), want)  # the burst's one token
    refused("tok-flood", "429", "tenant 'flood' is over its quota of 10 requests/s", 0.05)
    np.testing.assert_array_equal(infer("tok-flood"), want)  # retried at once: served
    refused("nobody", "401", "no tenant has these credentials", 0.09)
    if frontend == "native":
      assert bg.server.native.stats()["http_relayed"] == 0  # all of it answered in C++


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_a_stream_holds_an_over_quota_refusal_and_answers_its_other_requests(tmp_path, frontend):
  """ModelStreamInfer, predict and generate models alike: a request over its tenant's quota is
  refused (in-stream, the same message) once the quota would admit it again, as a unary call
  is, so a client that waits for its answers cannot spin the server; the stream's admitted
  requests are answered meanwhile, and the stream stays open."""
  import queue

  import tritonclient.grpc as tc

  from clientutil import triton_inputs
  from httputil import both_protocols
  from servingutil import mock_reference

  rate = 10  # requests/s, a burst of 1: the next token is due 100 ms after the first
  tenants = parse_tenants({"tenants": [
      {"name": "streamer", "tokens": ["tok-s"], "requests_per_s": rate, "requests_burst": 1}]})
  x, k = np.arange(8, dtype=np.float32).reshape(2, 4), np.full((2, 1), 2, np.int32)
  prompt = tc.InferInput("text_input", [1], "BYTES")
  prompt.set_data_from_numpy(np.array([b"ab"], dtype=object))
  calls = {"mock": lambda c, i: c.async_stream_infer("mock", triton_inputs({"x": x, "k": k}),
                                                    request_id=i),
           "lm": lambda c, i: c.async_stream_infer("lm", [prompt], request_id=i,
                                                  parameters={"max_tokens": 1})}
  with both_protocols(tmp_path / "repo", generate=True, tenants=tenants,
                      frontend=frontend) as bg:
    for model, send in calls.items():
      time.sleep(0.25)  # the burst's token is back
      got: queue.Queue = queue.Queue()
      with tc.InferenceServerClient(bg.address) as c:
        c.start_stream(lambda result, error: got.put((result, error, time.perf_counter())),
                       headers={"authorization": "Bearer tok-s"})
        t0 = time.perf_counter()
        send(c, "first")  # the token
        send(c, "second")  # over the quota
        answers = {}
        while len(answers) < 2:
          r, e, t = got.get(timeout=10)
          if e is None and not r.get_response().parameters["triton_final_response"].bool_param:
            continue  # a generation's pieces before its final response
          answers[r.get_response().id if e is None else "second"] = (r, e, t - t0)
        c.stop_stream()
      (first, ok_err, _), (_, err, held) = answers["first"], answers["second"]
      assert ok_err is None, ok_err
      if model == "mock":
        np.testing.assert_array_equal(first.as_numpy("y"), mock_reference(x, k)["y"])
      assert "tenant 'streamer' is over its quota of 10 requests/s" in err.message(), model
      assert 0.05 < held < 5.0, (model, held)  # held until a token is due, not refused at once
