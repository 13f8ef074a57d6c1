"""Fuzzing ModelInfer against the real server (MockEngine): mutated valid requests get a well-formed
answer or a clean INVALID_ARGUMENT / NOT_FOUND, never INTERNAL or UNKNOWN, and the server keeps
answering valid requests. XLASERVE_FUZZ_EXAMPLES sets the example count (default 500, plus 200
corrupted-wire cases); the examples are derandomized, so CI runs are reproducible."""

from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import FUZZ_SERVER, expected, mock_request, outputs

EXAMPLES = int(os.environ.get("XLASERVE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
# Inf and NaN inputs overflow inside the MockEngine's arithmetic, as they would in a model.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
DATATYPES = ["FP32", "INT32", "INT64", "UINT64", "INT8", "UINT8", "FP16", "BF16", "FP64", "BOOL",
             "BYTES", "INT16", "UINT32", "", "fp32", "FP33", "STRING"]
TYPED_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
               "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
               "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents"}
NP = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64,
      "INT8": np.int8, "INT16": np.int16, "UINT8": np.uint8, "UINT32": np.uint32,
      "UINT64": np.uint64, "FP16": np.float16, "BOOL": np.bool_}
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)
DIMS = st.one_of(st.integers(-3, 12), st.sampled_from([0, -1, 2**31, 2**40, 2**62, -(2**62)]))


PARAM_KEYS = ["timeout", "priority", "sequence_id", "binary_data_output", "", "k" * 80]
PARAM_VALUES = st.one_of(
    st.tuples(st.just("int64_param"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("int64_param"), st.integers(0, 10)),
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("string_param"), st.text(max_size=20)),
    st.tuples(st.just("double_param"), st.floats()),
    st.tuples(st.just("uint64_param"), st.integers(0, 2**64 - 1)))
MUTATIONS = ["model_name", "version", "input_name", "datatype", "dim", "shape", "payload_length",
             "content_mode", "typed_field", "missing_input", "extra_input", "duplicate_input",
             "param", "output", "rows_mismatch", "raw_count"]


def _as_int(v) -> int:
  return int(v) if not isinstance(v, float) or math.isfinite(v) else 0


def _payload(values: list, datatype: str) -> bytes:
  with np.errstate(all="ignore"):
    return np.asarray(values, np.float64).astype(NP.get(datatype, np.float32)).tobytes()


def _typed(values: list, field: str) -> list:
  if field in ("fp32_contents", "fp64_contents"):
    return [float(v) for v in values]
  if field == "bool_contents":
    return [bool(v) for v in values]
  return [abs(_as_int(v)) if field.startswith("uint") else _as_int(v) for v in values]


@st.composite
def infer_requests(draw):
  """A valid ModelInferRequest for the MockEngine (NaN/Inf included), then 0-3 mutations."""
  rows = draw(st.integers(1, 12))
  raw = draw(st.booleans())
  k_type = draw(st.sampled_from(["INT32", "INT64"]))  # INT64 ids are range-checked to INT32
  inputs = [
      {"name": "x", "datatype": "FP32", "shape": [rows, 4],
       "values": draw(st.lists(FLOATS, min_size=4 * rows, max_size=4 * rows))},
      {"name": "k", "datatype": k_type, "shape": [rows, 1],
       "values": draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=rows, max_size=rows))},
  ]
  for t in inputs:
    t["field"] = TYPED_FIELD[t["datatype"]]
    t["mode"] = "raw" if raw else "typed"
  d = {"model": "mock", "version": draw(st.sampled_from(["", "1"])), "inputs": inputs,
       "id": draw(st.text(max_size=20)), "params": [], "outputs": [], "raw_extra": 0}
  if draw(st.booleans()):
    d["params"].append(("priority", "int64_param", draw(st.integers(0, 5))))
  if draw(st.booleans()):
    d["params"].append(("timeout", "int64_param", draw(st.sampled_from([0, 10_000_000]))))
  d["outputs"] = draw(st.sampled_from([[], ["y"], ["z"], ["z", "y"], ["y", "y"]]))
  for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
    t = draw(st.sampled_from(d["inputs"])) if d["inputs"] else None
    if mutation == "model_name":
      d["model"] = draw(st.sampled_from(["", "nope", "../mock", "/etc/passwd", "mock\n",
                                          "m" * 300, "%2e%2e", "Mock", "mock/1"]))
    elif mutation == "version":
      d["version"] = draw(st.sampled_from(["2", "0", "-1", "abc", "9" * 30, " 1", "1.0",
                                            "\u0661", "../1"]))
    elif mutation == "param":
      kind, value = draw(PARAM_VALUES)
      d["params"].append((draw(st.sampled_from(PARAM_KEYS)), kind, value))
    elif mutation == "output":
      d["outputs"] = d["outputs"] + [draw(st.sampled_from(["nope", "", "Y", "x"]))]
    elif mutation == "extra_input":
      d["inputs"].append({"name": draw(st.sampled_from(["w", "", "X"])), "datatype": "FP32",
                          "shape": [rows, 2], "values": [1.0] * 2 * rows, "field": "fp32_contents",
                          "mode": "raw" if raw else "typed"})
    elif mutation == "raw_count":
      d["raw_extra"] = draw(st.sampled_from([-1, 1]))
    elif t is None:
      continue
    elif mutation == "input_name":
      t["name"] = draw(st.sampled_from(["", "X", "x ", "w", "\u00e9", "k" if t["name"] == "x"
                                         else "x"]))
    elif mutation == "datatype":
      t["datatype"] = draw(st.sampled_from(DATATYPES))
    elif mutation == "dim" and t["shape"]:
      t["shape"] = list(t["shape"])
      t["shape"][draw(st.integers(0, len(t["shape"]) - 1))] = draw(DIMS)
    elif mutation == "shape":
      t["shape"] = draw(st.lists(DIMS, max_size=4))
    elif mutation == "payload_length":
      cut = draw(st.sampled_from([-1, 1, -len(t["values"]), 3]))
      t["values"] = t["values"][:cut] if cut < 0 else t["values"] + [0] * cut
    elif mutation == "content_mode":
      t["mode"] = draw(st.sampled_from(["raw", "typed", "both", "none"]))
    elif mutation == "typed_field":
      t["field"] = draw(st.sampled_from(sorted(set(TYPED_FIELD.values()))))
    elif mutation == "missing_input":
      d["inputs"].remove(t)
    elif mutation == "duplicate_input":
      d["inputs"].append(dict(t))
    elif mutation == "rows_mismatch" and t["shape"]:
      t["shape"] = [t["shape"][0] + draw(st.sampled_from([-1, 1])), *t["shape"][1:]]
  return _build(d)


def _build(d: dict) -> pb.ModelInferRequest:
  req = pb.ModelInferRequest(model_name=d["model"], model_version=d["version"], id=d["id"])
  any_raw = any(t["mode"] in ("raw", "both") for t in d["inputs"])
  for t in d["inputs"]:
    ti = req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    if t["mode"] in ("typed", "both"):
      try:
        getattr(ti.contents, t["field"]).extend(_typed(t["values"], t["field"]))
      except (ValueError, TypeError):  # out of the field's range: a client cannot encode it
        pass
    if any_raw:
      req.raw_input_contents.append(_payload(t["values"], t["datatype"])
                                    if t["mode"] in ("raw", "both") else b"")
  if d["raw_extra"] < 0 and req.raw_input_contents:
    del req.raw_input_contents[-1]
  elif d["raw_extra"] > 0:
    req.raw_input_contents.append(b"\0" * 4)
  for key, kind, value in d["params"]:
    setattr(req.parameters[key], kind, value)
  for name in d["outputs"]:
    req.outputs.add(name=name).parameters["binary_data"].bool_param = True
  return req


def _decode(req: pb.ModelInferRequest) -> dict[str, np.ndarray]:
  """The inputs as the server should have read them (an independent re-implementation)."""
  arrays = {}
  for i, t in enumerate(req.inputs):
    dt = NP[t.datatype]
    if req.raw_input_contents:
      arr = np.frombuffer(req.raw_input_contents[i], dt)
    else:
      arr = np.asarray(getattr(t.contents, TYPED_FIELD[t.datatype]), dt)
    arrays[t.name] = arr.reshape(tuple(t.shape))
  return arrays


def _check_answer(req: pb.ModelInferRequest, resp: pb.ModelInferResponse) -> None:
  assert resp.model_name == req.model_name and resp.id == req.id
  assert resp.model_version == "1"
  names = [o.name for o in req.outputs] or ["y", "z"]
  assert [o.name for o in resp.outputs] == names
  assert len(resp.raw_output_contents) == len(resp.outputs)
  inputs = _decode(req)
  x, k = inputs["x"].astype(np.float32), inputs["k"].astype(np.int32)
  want = dict(zip(("y", "z"), expected(x, k)))
  got = outputs(resp)
  for o in resp.outputs:
    assert o.datatype == "FP32" and o.shape[0] == x.shape[0]
    np.testing.assert_array_equal(got[o.name], want[o.name].astype(np.float32))


def _assert_serves(stub) -> None:
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  k = np.array([[1], [2], [-3]], np.int32)
  out = outputs(stub.ModelInfer(mock_request(x, k), timeout=10))
  np.testing.assert_array_equal(out["y"], expected(x, k)[0])
  np.testing.assert_array_equal(out["z"], expected(x, k)[1])


def test_mutated_infer_requests_get_clean_answers(start_mock_server):
  bg, _ = start_mock_server(server_kwargs=FUZZ_SERVER)
  seen = {"cases": 0}
  with grpc.insecure_channel(bg.address) as ch:
    stub = pb_grpc.GRPCInferenceServiceStub(ch)

    @FUZZ
    @given(infer_requests())
    def run(req):
      seen["cases"] += 1
      try:
        resp = stub.ModelInfer(req, timeout=10)
      except grpc.RpcError as e:
        timeout = req.parameters.get("timeout")
        kind = timeout.WhichOneof("parameter_choice") if timeout is not None else None
        may_expire = kind in ("int64_param", "uint64_param") and getattr(timeout, kind) > 0
        allowed = CLEAN | ({grpc.StatusCode.DEADLINE_EXCEEDED} if may_expire else set())
        assert e.code() in allowed, (e.code(), e.details(), req)
        assert e.details()
        seen[e.code().name] = seen.get(e.code().name, 0) + 1
        return
      seen["OK"] = seen.get("OK", 0) + 1
      _check_answer(req, resp)

    run()
    _assert_serves(stub)
  assert seen["cases"] >= EXAMPLES
  assert seen.get("OK", 0) > EXAMPLES // 20 and seen.get("INVALID_ARGUMENT", 0) > EXAMPLES // 4
  print(f"fuzzed ModelInfer: {seen}")


@st.composite
def corrupted_wire(draw):
  """Bytes of a valid serialized request with some bytes flipped, cut or inserted."""
  req = draw(infer_requests())
  data = bytearray(req.SerializeToString())
  for _ in range(draw(st.integers(1, 4))):
    op = draw(st.sampled_from(["flip", "cut", "insert"]))
    pos = draw(st.integers(0, max(len(data) - 1, 0)))
    if op == "flip" and data:
      data[pos] ^= draw(st.integers(1, 255))
    elif op == "cut":
      del data[pos:pos + draw(st.integers(1, 8))]
    else:
      data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
  return bytes(data)


def test_corrupted_wire_bytes_get_clean_answers(start_mock_server):
  bg, _ = start_mock_server(server_kwargs=FUZZ_SERVER)
  seen = {"cases": 0}
  with grpc.insecure_channel(bg.address) as ch:
    call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")

    @settings(FUZZ, max_examples=max(EXAMPLES * 2 // 5, 10))
    @given(corrupted_wire())
    def run(data):
      seen["cases"] += 1
      try:
        call(data, timeout=10)
        seen["OK"] = seen.get("OK", 0) + 1
      except grpc.RpcError as e:
        assert e.code() in CLEAN | {grpc.StatusCode.DEADLINE_EXCEEDED}, (e.code(), e.details())
        seen[e.code().name] = seen.get(e.code().name, 0) + 1

    run()
    _assert_serves(pb_grpc.GRPCInferenceServiceStub(ch))
  assert seen["cases"] >= max(EXAMPLES * 2 // 5, 10)
  assert sum(n for outcome, n in seen.items() if outcome != "cases") == seen["cases"]
  print(f"fuzzed wire bytes: {seen}")
