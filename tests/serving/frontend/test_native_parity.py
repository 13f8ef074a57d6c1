"""The native (C++) gRPC front end and the Python one behind the same repository give the same
bytes: every dtype, requested outputs and versions, what the C++ side relays, parameters it
ignores, undecodable bytes, concurrent tritonclient clients, and differential fuzzing (hypothesis
cases, and libFuzzer's corpus and seeds from fuzz/)."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import os
import pathlib
from typing import Callable

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tc

from bundle import TensorSpec
from clientutil import triton_inputs, write_engine_bundle
from serving.engines import Engine
from serving.frontend import native as native_frontend
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import FUZZ_SERVER, expected, metric, mock_factory, mock_request, mock_rows, \
    rpc_code, rpc_result, serving, write_mock_bundle

NATIVE, WHY = native_frontend.load_extension()
needs_native = pytest.mark.skipif(NATIVE is None, reason=WHY)

DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool")


class DtypeEngine(Engine):
  """One input per dtype, [-1, 3]; each output is its input plus one (bool: negated)."""

  def __init__(self, buckets=(1, 4, 8)):
    self.inputs = tuple(TensorSpec(f"in_{d}", d, (-1, 3), ("batch", None)) for d in DTYPES)
    self.outputs = tuple(TensorSpec(f"out_{d}", d, (-1, 3), ("batch", None)) for d in DTYPES)
    self.buckets = buckets

  def warmup(self, *, progress=None) -> None:
    pass

  def dispatch(self, *, bucket, inputs):
    return {f"out_{d}": (~inputs[f"in_{d}"] if d == "bool" else inputs[f"in_{d}"] + 1)
            for d in DTYPES}

  def fetch(self, handle):
    return handle


def _dtype_repo(root):
  write_engine_bundle(root, "dtypes", DtypeEngine())
  write_mock_bundle(root, "mock", 1)
  return root


def _factory(path, manifest, cfg):
  return DtypeEngine(manifest.batch_buckets) if manifest.name == "dtypes" else \
      mock_factory()(path, manifest, cfg)


def _np(d):
  return np.dtype(ml_dtypes.bfloat16) if d == "bfloat16" else np.dtype(d)


def _dtype_request(rows, rng, **params):
  req = pb.ModelInferRequest(model_name="dtypes", id="parity")
  for d in DTYPES:
    a = (rng.random((rows, 3)) > 0.5 if d == "bool" else
         (rng.random((rows, 3)) * 100).astype(_np(d)))
    req.inputs.add(name=f"in_{d}", datatype=TensorSpec("x", d, (-1,), ("batch",)).datatype,
                   shape=[rows, 3])
    req.raw_input_contents.append(np.ascontiguousarray(a, _np(d)).tobytes())
  for k, v in params.items():
    req.parameters[k].int64_param = v
  return req


@pytest.fixture(scope="module")
def both(tmp_path_factory):
  """The same repository behind a native and a Python front end: {kind: (server, stub)}."""
  repo = _dtype_repo(tmp_path_factory.mktemp("parity") / "repo")
  out = {}
  with serving(repo, _factory, frontend="python", **FUZZ_SERVER) as py_bg, \
      serving(repo, _factory, frontend="auto", **FUZZ_SERVER) as nat_bg:
    for kind, bg in (("python", py_bg), ("native", nat_bg)):
      ch = grpc.insecure_channel(bg.address)
      out[kind] = (bg, pb_grpc.GRPCInferenceServiceStub(ch))
    yield out


def _relayed(bg):
  return bg.server.native.stats()["relayed"] if bg.server.native else 0


@needs_native
def test_every_dtype_gives_byte_identical_responses(both):
  rng = np.random.default_rng(0)
  nat_bg, nat = both["native"]
  assert nat_bg.server.frontend == "native"
  fast0 = nat_bg.server.native.stats()["fast"]
  for rows in (1, 3, 8, 21):  # 21 rows: split across batches of the largest bucket
    req = _dtype_request(rows, rng)
    got, want = nat.ModelInfer(req), both["python"][1].ModelInfer(req)
    assert got.SerializeToString() == want.SerializeToString()
    for o, raw in zip(got.outputs, got.raw_output_contents):
      d = o.name[4:]
      i = [t.name for t in req.inputs].index(f"in_{d}")
      x = np.frombuffer(req.raw_input_contents[i], _np(d)).reshape(rows, 3)
      y = np.frombuffer(raw, _np(d)).reshape(tuple(o.shape))
      np.testing.assert_array_equal(y, ~x if d == "bool" else x + 1)
  assert nat_bg.server.native.stats()["fast"] == fast0 + 4  # none of them was relayed


@needs_native
def test_requested_outputs_and_versions_match(both):
  rng = np.random.default_rng(1)
  for version in ("", "1"):
    req = _dtype_request(2, rng)
    req.model_version = version
    req.outputs.add(name="out_int8")
    req.outputs.add(name="out_bfloat16")
    got = both["native"][1].ModelInfer(req)
    assert [o.name for o in got.outputs] == ["out_int8", "out_bfloat16"]
    assert got.SerializeToString() == both["python"][1].ModelInfer(req).SerializeToString()


def _fallthrough_cases(rng):
  x, k = rng.random((3, 4)).astype(np.float32), np.arange(3, dtype=np.int32).reshape(3, 1)
  cases = {}
  typed = pb.ModelInferRequest(model_name="mock")
  t = typed.inputs.add(name="x", datatype="FP32", shape=[3, 4])
  t.contents.fp32_contents.extend(x.reshape(-1).tolist())
  t = typed.inputs.add(name="k", datatype="INT32", shape=[3, 1])
  t.contents.int_contents.extend(k.reshape(-1).tolist())
  cases["typed contents"] = typed
  bad_shape = mock_request(x, k)
  bad_shape.inputs[0].shape[:] = [3, 5]
  cases["bad shape"] = bad_shape
  short = mock_request(x, k)
  short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
  cases["short raw bytes"] = short
  cases["unknown model"] = mock_request(x, k, model="nope")
  cases["unknown version"] = mock_request(x, k, version="7")
  cases["bad version"] = mock_request(x, k, version="x")
  widened = pb.ModelInferRequest(model_name="mock")
  widened.inputs.add(name="x", datatype="FP32", shape=[3, 4])
  widened.inputs.add(name="k", datatype="INT64", shape=[3, 1])
  widened.raw_input_contents.extend([x.tobytes(), k.astype(np.int64).tobytes()])
  cases["int64 for int32"] = widened
  cases["other parameter"] = mock_request(x, k, sequence_id=3)
  cases["negative timeout"] = mock_request(x, k, timeout=-1)
  missing = mock_request(x, k)
  del missing.inputs[1]
  del missing.raw_input_contents[1]
  cases["missing input"] = missing
  unknown_out = mock_request(x, k)
  unknown_out.outputs.add(name="nope")
  cases["unknown output"] = unknown_out
  return cases


@needs_native
def test_what_it_does_not_serve_is_relayed_with_python_semantics(both):
  cases = _fallthrough_cases(np.random.default_rng(2))
  nat_bg = both["native"][0]
  relayed0 = _relayed(nat_bg)
  for name, req in cases.items():
    got = rpc_result(both["native"][1].ModelInfer, req)
    want = rpc_result(both["python"][1].ModelInfer, req)
    assert (got[1], got[0] and got[0].SerializeToString()) == \
        (want[1], want[0] and want[0].SerializeToString()), name
  nat = both["native"][1]
  assert rpc_code(nat.ModelInfer, cases["unknown model"]) == grpc.StatusCode.NOT_FOUND
  assert rpc_code(nat.ModelInfer, cases["bad shape"]) == grpc.StatusCode.INVALID_ARGUMENT
  assert _relayed(nat_bg) >= relayed0 + len(cases) - 1  # "other parameter" is served natively


@needs_native
def test_parameters_python_ignores_are_ignored_natively(both):
  """perf_analyzer sends triton_enable_empty_final_response; plain models ignore it."""
  nat_bg, nat = both["native"]
  req = mock_request(*mock_rows(np.random.default_rng(0), 2))
  req.parameters["triton_enable_empty_final_response"].bool_param = True
  req.parameters["note"].string_param = "hello"
  req.parameters["weight"].double_param = 0.5
  req.parameters["priority"].uint64_param = 2
  fast = nat_bg.server.native.stats()["fast"]
  assert nat.ModelInfer(req).SerializeToString() == \
      both["python"][1].ModelInfer(req).SerializeToString()
  assert nat_bg.server.native.stats()["fast"] == fast + 1


@needs_native
def test_undecodable_bytes_and_other_methods_are_relayed(both):
  for kind in ("python", "native"):
    bg = both[kind][0]
    with grpc.insecure_channel(bg.address) as ch:
      raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
      with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff garbage")
      assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
      stub = pb_grpc.GRPCInferenceServiceStub(ch)
      assert stub.ServerLive(pb.ServerLiveRequest()).live
      meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mock"))
      assert [t.name for t in meta.inputs] == ["x", "k"]
      assert rpc_code(ch.unary_unary("/no.Such/Method"), b"") == grpc.StatusCode.UNIMPLEMENTED
  # The call counts are exported to Prometheus, read at scrape time.
  bg = both["native"][0]
  text = bg.server.metrics.exposition().decode()
  for path, n in bg.server.native.stats().items():
    if path in ("fast", "relayed", "forwarded"):
      assert metric(text, "xlaserve_native_calls_total", path=path) == n
  assert metric(text, "xlaserve_native_calls_total", path="relayed") >= 4


@needs_native
def test_tritonclient_concurrent_clients_get_their_own_rows(both):
  bg = both["native"][0]
  fast0 = bg.server.native.stats()["fast"]

  def client(seed):
    rng = np.random.default_rng(seed)
    c = tc.InferenceServerClient(bg.address)
    for i in range(15):
      n = int(rng.integers(1, 12))
      x = rng.random((n, 4)).astype(np.float32)
      k = rng.integers(-3, 3, (n, 1)).astype(np.int32)
      r = c.infer("mock", triton_inputs({"x": x, "k": k}), request_id=f"{seed}-{i}")
      y, z = expected(x, k)
      assert r.get_response().id == f"{seed}-{i}"
      np.testing.assert_allclose(r.as_numpy("y"), y, rtol=1e-6)
      np.testing.assert_allclose(r.as_numpy("z"), z, rtol=1e-6)
    c.close()

  with cf.ThreadPoolExecutor(12) as ex:
    list(ex.map(client, range(12)))
  assert bg.server.native.stats()["fast"] == fast0 + 12 * 15


@needs_native
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # Inf/NaN inputs
def _raw_callers(addresses: dict) -> tuple[dict, Callable]:
  """(channels to close, answer(kind, bytes) -> (response bytes, None) or (None, (code,
  details))): ModelInfer with raw request bytes to each front end."""
  channels = {k: grpc.insecure_channel(a) for k, a in addresses.items()}
  raw = {k: ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
         for k, ch in channels.items()}

  def answer(kind, data):
    try:
      return raw[kind](data, timeout=10), None
    except grpc.RpcError as e:
      return None, (e.code(), e.details())
  return channels, answer


def test_fuzzed_requests_get_identical_answers_from_both_front_ends(both):
  """Differential fuzzing: whatever the C++ side serves or relays, the client sees the bytes
  (or the status and message) the Python front end gives."""
  from hypothesis import HealthCheck, given, settings
  from test_fuzz import corrupted_wire, infer_requests

  examples = max(int(os.environ.get("XLASERVE_FUZZ_EXAMPLES", "500")) // 4, 10)
  calls = {k: both[k][0] for k in both}
  channels, answer = _raw_callers({k: bg.address for k, bg in calls.items()})

  @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
            suppress_health_check=list(HealthCheck))
  @given(st_requests=infer_requests(), st_wire=corrupted_wire())
  def run(st_requests, st_wire):
    for data in (st_requests.SerializeToString(), st_wire):
      got, want = answer("native", data), answer("python", data)
      if grpc.StatusCode.DEADLINE_EXCEEDED in {e[0] for _, e in (got, want) if e}:
        continue  # a small timeout parameter races the queue on either server
      assert got == want, (got, want)

  before = calls["native"].server.native.stats()
  try:
    run()
  finally:
    for ch in channels.values():
      ch.close()
  after = calls["native"].server.native.stats()
  assert after["fast"] > before["fast"] and after["relayed"] > before["relayed"]  # both paths


FUZZ = pathlib.Path(__file__).resolve().parents[3] / "fuzz"
CORPUS_CAP = 400  # files sent to both front ends (~2 s)


def fuzz_corpus(tmp: pathlib.Path, cap: int = CORPUS_CAP) -> dict[str, bytes]:
  """fuzz/'s gRPC inputs: past crashes, the seeds (fuzz/seeds.py) and an even sample of the
  checked-in corpus, `cap` files in all, by name."""
  spec = importlib.util.spec_from_file_location("fuzz_seeds", FUZZ / "seeds.py")
  seeds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(seeds)
  seeds.write(tmp)
  fixed = sorted((FUZZ / "regressions" / "grpc").glob("*")) + sorted((tmp / "grpc").glob("*"))
  corpus = sorted((FUZZ / "corpus" / "grpc").glob("*"))
  room = max(cap - len(fixed), 0)
  step = max(len(corpus) // room, 1) if room else len(corpus) + 1
  return {p.name: p.read_bytes() for p in [*fixed, *corpus[::step][:room]]}


@needs_native
@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # Inf/NaN inputs
def test_fuzz_corpus_gets_identical_answers_from_both_front_ends(both, tmp_path):
  """The same bytes, whatever libFuzzer made of them, get the same answer from the native and
  the Python front end: response bytes, or status code and message."""
  files = fuzz_corpus(tmp_path)
  assert len(files) >= 30, sorted(files)
  channels, answer = _raw_callers({k: both[k][0].address for k in both})

  outcomes = {}
  try:
    for name, data in files.items():
      got, want = answer("native", data), answer("python", data)
      if grpc.StatusCode.DEADLINE_EXCEEDED in {e[0] for _, e in (got, want) if e}:
        continue  # a small timeout parameter races the queue on either server
      assert got == want, (name, data[:200], got, want)
      outcome = "OK" if got[1] is None else got[1][0].name
      outcomes[outcome] = outcomes.get(outcome, 0) + 1
  finally:
    for ch in channels.values():
      ch.close()
  print(f"fuzz corpus, both front ends: {outcomes}")
  assert outcomes.get("OK", 0) >= 10 and outcomes.get("INVALID_ARGUMENT", 0) >= 5, outcomes


def _protobuf_rejects(base: bytes) -> dict[str, bytes]:
  """Bytes the C++ parser once served although protobuf (the Python servicer) refuses them,
  found by fuzz/grpc_request_fuzz.cc's protobuf oracle: `base` is a valid mock request."""
  bad, entry = b"\x0a\x02\xc3\x28", b"\x0a\x01n\x12\x02\x08\x01"  # a bad UTF-8 key; n: true
  out = b"\x0a\x01y"
  return {
      "output parameters not a message": base + b"\x32\x06" + out + b"\x12\x01\xff",
      "output parameter key not UTF-8": base + b"\x32\x0b" + out + b"\x12\x06" + bad + b"\x12\x00",
      "tag in 6 bytes": b"\x8a\x80\x80\x80\x80\x00" + base[1:],
      "length in 6 bytes": base[:1] + b"\x84\x80\x80\x80\x80\x00" + base[2:],
      "model name twice, first not UTF-8": b"\x0a\x02\xc3\x28" + base,
      "id twice, first not UTF-8": b"\x1a\x02\xc3\x28\x1a\x01i" + base,
      "parameter key twice": base + b"\x22\x0b" + bad + entry,
      "output name twice": base + b"\x32\x07\x0a\x02\xc3\x28" + out,
  }


@needs_native
def test_what_protobuf_rejects_is_relayed_not_served(both):
  """Regression (found by libFuzzer): each case got an answer from the native front end and
  INVALID_ARGUMENT from the Python one; now both refuse it alike and the server keeps serving."""
  nat_bg, nat = both["native"]
  x, k = mock_rows(np.random.default_rng(3), 2)
  base = mock_request(x, k).SerializeToString()
  relayed0 = _relayed(nat_bg)
  for name, data in _protobuf_rejects(base).items():
    with pytest.raises(Exception):
      pb.ModelInferRequest.FromString(data)  # the reference: protobuf refuses it
    results = []
    for kind in ("native", "python"):
      with grpc.insecure_channel(both[kind][0].address) as ch:
        with pytest.raises(grpc.RpcError) as e:
          ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(data, timeout=10)
      results.append((e.value.code(), e.value.details()))
    assert results[0] == results[1], name
    assert results[0][0] == grpc.StatusCode.INVALID_ARGUMENT, (name, results[0])
    assert "not a valid protobuf message" in results[0][1], (name, results[0])
  assert _relayed(nat_bg) == relayed0 + len(_protobuf_rejects(base))
  y, z = expected(x, k)
  got = nat.ModelInfer(mock_request(x, k))
  np.testing.assert_array_equal(np.frombuffer(got.raw_output_contents[0], np.float32), y.ravel())
  np.testing.assert_array_equal(np.frombuffer(got.raw_output_contents[1], np.float32), z.ravel())
