"""Seed inputs for the native front end's fuzz targets (fuzz/*_fuzz.cc), written as files.

`grpc/`: serialized ModelInferRequests, valid ones for every datatype of the models in
fuzz/fuzz_models.h ("dtypes": one input per datatype; "mock"; "ctx": context inputs, BYTES) and
the malformed cases the tests send (tests/serving/frontend/test_native_parity.py,
test_fuzz.py). `http/`: whole HTTP/1.1 requests, binary-tensor infers of the same models and the
head and header cases of test_native_http_fuzz.py. Deterministic: the same files every run.

Usage: python fuzz/seeds.py OUT  (run from the repository root; needs numpy and the protocol).
"""

from __future__ import annotations

import json
import pathlib
import struct
import sys

import numpy as np

from serving.frontend.protocol import grpc_service_pb2 as pb

# "dtypes" of fuzz_models.h: Triton datatype -> numpy dtype (bfloat16 as its raw 16 bits).
DTYPES = {"FP32": "float32", "FP16": "float16", "BF16": "uint16", "INT32": "int32",
          "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}
NAMES = {"FP32": "float32", "FP16": "float16", "BF16": "bfloat16", "INT32": "int32",
         "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def _array(rng: np.random.Generator, datatype: str, shape: tuple) -> np.ndarray:
  if datatype == "BOOL":
    return rng.random(shape) > 0.5
  return (rng.random(shape) * 100).astype(DTYPES[datatype])


def bytes_elements(items: list[bytes]) -> bytes:
  """Triton's raw BYTES encoding: each element a 4-byte little-endian length, then its bytes."""
  return b"".join(struct.pack("<I", len(b)) + b for b in items)


def model_tensors(model: str, rows: int, rng: np.random.Generator) -> list[tuple]:
  """(name, datatype, shape, raw bytes) of every input of a fuzz_models.h model."""
  if model == "dtypes":
    return [(f"in_{NAMES[d]}", d, (rows, 3), _array(rng, d, (rows, 3)).tobytes()) for d in DTYPES]
  if model == "mock":
    return [("x", "FP32", (rows, 4), rng.random((rows, 4)).astype(np.float32).tobytes()),
            ("k", "INT32", (rows, 1), rng.integers(-3, 4, (rows, 1)).astype(np.int32).tobytes())]
  return [("rows", "FP32", (rows, 2), rng.random((rows, 2)).astype(np.float32).tobytes()),
          ("user", "INT64", (1, 3), np.arange(3, dtype=np.int64).tobytes()),
          ("query", "BYTES", (1, 2), bytes_elements([b"shoes", "caf\u00e9".encode()]))]


def grpc_request(model: str, rows: int, rng: np.random.Generator, *, version: str = "",
                 outputs: tuple = (), **params) -> pb.ModelInferRequest:
  req = pb.ModelInferRequest(model_name=model, model_version=version, id=f"seed-{rows}")
  for name, datatype, shape, raw in model_tensors(model, rows, rng):
    req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    req.raw_input_contents.append(raw)
  for name in outputs:
    req.outputs.add(name=name).parameters["binary_data"].bool_param = True
  for key, value in params.items():
    setattr(req.parameters[key], *value)
  return req


def _grpc_valid(rng: np.random.Generator) -> dict[str, bytes]:
  out = {}
  for model in ("dtypes", "mock", "ctx"):
    for rows in (1, 3):
      out[f"{model}_{rows}"] = grpc_request(model, rows, rng)
  out["dtypes_v1_outputs"] = grpc_request("dtypes", 2, rng, version="1",
                                          outputs=("out_int8", "out_bfloat16"))
  out["mock_params"] = grpc_request("mock", 2, rng, timeout=("int64_param", 10_000_000),
                                    priority=("uint64_param", 2))
  out["mock_ignored_params"] = grpc_request(
      "mock", 2, rng, triton_enable_empty_final_response=("bool_param", True),
      note=("string_param", "hello"), weight=("double_param", 0.5))
  out["ctx_outputs"] = grpc_request("ctx", 2, rng, outputs=("pooled",))
  return {k: v.SerializeToString() for k, v in out.items()}


def _grpc_malformed(rng: np.random.Generator) -> dict[str, bytes]:
  """The cases test_native_parity.py's fallthrough list and test_fuzz.py's mutations name."""
  cases = {}

  def case(name, edit, model="mock"):
    req = grpc_request(model, 3, rng)
    edit(req)
    cases[name] = req

  def typed(r):
    del r.raw_input_contents[:]
    r.inputs[0].contents.fp32_contents.extend([0.5] * 12)
    r.inputs[1].contents.int_contents.extend([1, 2, 3])

  case("typed_contents", typed)
  case("bad_shape", lambda r: r.inputs[0].shape.__setitem__(1, 5))
  case("short_raw", lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-4]))
  case("unknown_model", lambda r: setattr(r, "model_name", "nope"))
  case("unknown_version", lambda r: setattr(r, "model_version", "7"))
  case("bad_version", lambda r: setattr(r, "model_version", "x"))
  case("int64_for_int32", lambda r: (setattr(r.inputs[1], "datatype", "INT64"),
                                     r.raw_input_contents.__setitem__(1, bytes(24))))
  case("other_parameter", lambda r: setattr(r.parameters["sequence_id"], "int64_param", 3))
  case("negative_timeout", lambda r: setattr(r.parameters["timeout"], "int64_param", -1))
  case("timeout_as_string", lambda r: setattr(r.parameters["timeout"], "string_param", "5"))
  case("missing_input", lambda r: (r.inputs.__delitem__(1), r.raw_input_contents.__delitem__(1)))
  case("unknown_output", lambda r: r.outputs.add(name="nope"))
  case("duplicate_input", lambda r: (r.inputs.append(r.inputs[0]),
                                     r.raw_input_contents.append(r.raw_input_contents[0])))
  case("extra_raw", lambda r: r.raw_input_contents.append(b"\0" * 4))
  case("rows_mismatch", lambda r: r.inputs[1].shape.__setitem__(0, 2))
  case("huge_dims", lambda r: r.inputs[0].shape.__setitem__(0, 2**40))
  case("negative_dims", lambda r: r.inputs[0].shape.__setitem__(0, -1))
  case("zero_rows", lambda r: (r.inputs[0].shape.__setitem__(0, 0),
                               r.inputs[1].shape.__setitem__(0, 0)))
  case("wrong_datatype", lambda r: setattr(r.inputs[0], "datatype", "FP64"))
  case("bytes_too_short", lambda r: r.raw_input_contents.__setitem__(2, b"\5\0\0\0ab"), "ctx")
  case("context_two_rows", lambda r: r.inputs[1].shape.__setitem__(0, 2), "ctx")
  out = {k: v.SerializeToString() for k, v in cases.items()}
  valid = grpc_request("mock", 2, rng).SerializeToString()
  out["garbage"] = b"\xff\xff\xff garbage"
  out["truncated"] = valid[:-7]
  out["bad_utf8_id"] = valid + b"\x1a\x02\xc3\x28"  # field 3 (id): an invalid 2-byte sequence
  out["unknown_field"] = valid + b"\x42\x01x"  # field 8
  out["empty"] = b""
  return out


def _http(method: str, target: str, headers: list[tuple], body: bytes = b"") -> bytes:
  lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
  return f"{method} {target} HTTP/1.1\r\n{lines}\r\n".encode("latin-1") + body


def http_infer(model: str, rows: int, rng: np.random.Generator, *, target: str | None = None,
               outputs: tuple = (), headers: tuple = (), ihcl: object = None,
               edit=None) -> bytes:
  """A binary-tensor infer (Triton's binary data extension) of a fuzz_models.h model."""
  tensors = model_tensors(model, rows, rng)
  head = {"id": f"seed-{rows}", "inputs": [
      {"name": n, "datatype": d, "shape": list(s), "parameters": {"binary_data_size": len(raw)}}
      for n, d, s, raw in tensors]}
  if outputs:
    head["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
  else:
    head["parameters"] = {"binary_data_output": True}
  if edit is not None:
    edit(head)
  text = json.dumps(head).encode()
  body = text + b"".join(raw for *_, raw in tensors)
  return _http("POST", target or f"/v2/models/{model}/infer",
               [("Host", "x"), ("Content-Length", len(body)),
                ("Inference-Header-Content-Length", len(text) if ihcl is None else ihcl),
                *headers], body)


def _http_cases(rng: np.random.Generator) -> dict[str, bytes]:
  out = {f"{m}_{rows}": http_infer(m, rows, rng) for m in ("dtypes", "mock", "ctx")
         for rows in (1, 3)}
  out["mock_version"] = http_infer("mock", 2, rng, target="/v2/models/mock/versions/1/infer")
  out["mock_outputs"] = http_infer("mock", 2, rng, outputs=("z", "y"))
  out["mock_close"] = http_infer("mock", 1, rng, headers=(("Connection", "keep-alive, close"),))
  out["mock_continue"] = http_infer("mock", 1, rng, headers=(("Expect", "100-continue"),))
  out["pipelined"] = http_infer("mock", 1, rng) + http_infer("dtypes", 1, rng)
  for i, v in enumerate((0, -1, " 10", "+10", "abc", "", "9" * 20, "0009")):
    out[f"ihcl_{i}"] = http_infer("mock", 1, rng, ihcl=v)
  out["ihcl_twice"] = http_infer("mock", 1, rng, headers=(("Inference-Header-Content-Length",
                                                           "10"),))
  out["gzip_accepted"] = http_infer("mock", 1, rng, headers=(("Accept-Encoding", "gzip"),))
  out["identity_encoding"] = http_infer("mock", 1, rng, headers=(("Content-Encoding",
                                                                  "identity"),))
  out["json_output"] = http_infer("mock", 1, rng, edit=lambda h: h.__setitem__(
      "parameters", {"binary_data_output": False}))
  out["bad_size"] = http_infer("mock", 1, rng, edit=lambda h: h["inputs"][0]["parameters"]
                               .__setitem__("binary_data_size", 2**62))
  out["json_data"] = http_infer("mock", 1, rng, edit=lambda h: h["inputs"][0].__setitem__(
      "data", [1.0, 2.0, 3.0, 4.0]))
  out["shape_huge"] = http_infer("mock", 1, rng, edit=lambda h: h["inputs"][0].__setitem__(
      "shape", [2**63 - 1, 4]))
  out["chunked"] = _http("POST", "/v2/models/mock/infer", [("Transfer-Encoding", "chunked")],
                         b"4\r\nabcd\r\n0\r\n\r\n")
  out["two_lengths"] = _http("POST", "/v2/models/mock/infer", [("Content-Length", "1"),
                                                               ("Content-Length", "2")], b"ab")
  out["http10"] = b"GET /v2/health/ready HTTP/1.0\r\n\r\n"
  out["upgrade"] = _http("GET", "/", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
  out["bare_lf"] = b"GET / HTTP/1.1\nHost: x\n\n"
  out["bare_cr"] = b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n"
  out["health"] = _http("GET", "/v2/health/ready", [("Host", "x")])
  out["percent_target"] = _http("POST", "/v2/models/m%6fck/infer", [("Content-Length", "0")])
  return out


def write(out: pathlib.Path) -> dict[str, int]:
  """Writes OUT/grpc/* and OUT/http/*; returns the count of files in each."""
  rng = np.random.default_rng(0)
  sets = {"grpc": {**_grpc_valid(rng), **_grpc_malformed(rng)}, "http": _http_cases(rng)}
  for kind, files in sets.items():
    (out / kind).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
      (out / kind / f"seed_{name}").write_bytes(data)
  return {kind: len(files) for kind, files in sets.items()}


if __name__ == "__main__":
  print(write(pathlib.Path(sys.argv[1])))
