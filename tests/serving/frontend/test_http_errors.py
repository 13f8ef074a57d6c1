"""HTTP errors: each mistake gets the same message over HTTP and gRPC, with Triton's HTTP status for
the gRPC code; malformed bodies get 400 and the server keeps serving; shed load and expired
deadlines get 503 as in Triton."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import grpc
import numpy as np
import pytest

from httputil import Http, both_protocols
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from servingutil import FUZZ_SERVER, expected, mock_request, mock_rows

STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
          grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
          grpc.StatusCode.DEADLINE_EXCEEDED: 503}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  with both_protocols(tmp_path_factory.mktemp("errors") / "repo", **FUZZ_SERVER) as bg:
    with grpc.insecure_channel(bg.address) as ch:
      yield bg, Http(bg.server.http_port), pb_grpc.GRPCInferenceServiceStub(ch)


def tensor(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple:
  return name, datatype, shape, raw


def good_inputs(n: int = 2) -> list[tuple]:
  return [tensor("x", "FP32", [n, 4], np.zeros((n, 4), np.float32).tobytes()),
          tensor("k", "INT32", [n, 1], np.zeros((n, 1), np.int32).tobytes())]


def as_grpc(model: str, version: str, inputs: list[tuple], outputs=(), params=None):
  req = pb.ModelInferRequest(model_name=model, model_version=version)
  for name, datatype, shape, raw in inputs:
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
  for name in outputs:
    req.outputs.add(name=name)
  for key, value in (params or {}).items():
    req.parameters[key].int64_param = value
  return req


def as_http(inputs: list[tuple], outputs=(), params=None) -> tuple[bytes, dict[str, str]]:
  """Triton's binary tensor extension: the JSON header, then each input's bytes."""
  head = {"inputs": [{"name": n, "datatype": d, "shape": s,
                      "parameters": {"binary_data_size": len(raw)}} for n, d, s, raw in inputs]}
  if outputs:
    head["outputs"] = [{"name": name} for name in outputs]
  if params:
    head["parameters"] = params
  header = json.dumps(head).encode()
  return header + b"".join(raw for *_, raw in inputs), {
      "Inference-Header-Content-Length": str(len(header))}


def _cases() -> dict[str, tuple]:
  """name -> (model, version, inputs, outputs, params): one mistake each."""
  x2, k2 = good_inputs(2)
  return {
      "unknown model": ("nope", "", good_inputs(), (), None),
      "unknown version": ("mock", "7", good_inputs(), (), None),
      "version not a number": ("mock", "x1", good_inputs(), (), None),
      "path-like name": ("..", "", good_inputs(), (), None),
      "wrong shape": ("mock", "", [tensor("x", "FP32", [2, 5], bytes(40)), k2], (), None),
      "wrong rank": ("mock", "", [tensor("x", "FP32", [2, 4, 1], bytes(32)), k2], (), None),
      "wrong datatype": ("mock", "", [tensor("x", "FP16", [2, 4], bytes(16)), k2], (), None),
      "missing input": ("mock", "", [x2], (), None),
      "unexpected input": ("mock", "", [x2, k2, tensor("w", "FP32", [2, 1], bytes(8))], (),
                           None),
      "short data": ("mock", "", [tensor("x", "FP32", [2, 4], bytes(31)), k2], (), None),
      "rows differ": ("mock", "", [x2, tensor("k", "INT32", [3, 1], bytes(12))], (), None),
      "zero rows": ("mock", "", [tensor("x", "FP32", [0, 4], b""),
                                 tensor("k", "INT32", [0, 1], b"")], (), None),
      "int64 out of range": ("mock", "", [x2, tensor("k", "INT64", [2, 1],
                                                     np.array([[1], [2**40]]).tobytes())], (),
                             None),
      "unknown output": ("mock", "", good_inputs(), ("nope",), None),
      "negative timeout": ("mock", "", good_inputs(), (), {"timeout": -1}),
  }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_same_mistake_same_message_on_both_protocols(server, case):
  _, api, stub = server
  model, version, inputs, outputs, params = _cases()[case]
  with pytest.raises(grpc.RpcError) as e:
    stub.ModelInfer(as_grpc(model, version, inputs, outputs, params))
  body, headers = as_http(inputs, outputs, params)
  path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
  status, _, answer = api.call("POST", path, body, headers)
  assert (status, json.loads(answer)) == (STATUS[e.value.code()], {"error": e.value.details()})


@pytest.mark.parametrize("path,method", [("/v2/models/nope", "ModelMetadata"),
                                         ("/v2/models/mock/versions/9/config", "ModelConfig"),
                                         ("/v2/models/nope/stats", "ModelStatistics")])
def test_metadata_errors_match_grpc(server, path, method):
  _, api, stub = server
  parts = path.split("/")
  name, version = parts[3], parts[5] if "versions" in parts else ""
  request = getattr(pb, f"{method}Request")(name=name, version=version)
  with pytest.raises(grpc.RpcError) as e:
    getattr(stub, method)(request)
  status, _, body = api.get(path)
  assert (status, json.loads(body)) == (STATUS[e.value.code()], {"error": e.value.details()})


MALFORMED = {
    "not JSON": (b"{inputs: [", None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "must be a JSON object"),
    "nested too deep": (b"[" * 100_000, None, "not valid JSON"),
    "no inputs": (b"{}", None, "needs 'inputs'"),
    "header length not a number": (b"{}", "abc", "Inference-Header-Content-Length 'abc'"),
    "header length past the body": (b"{}", "99", "Inference-Header-Content-Length '99'"),
    "binary size past the data": (None, "binary past", "runs past the binary data"),
    "binary left over": (None, "binary left", "belong to no input"),
    "shape not integers": (json.dumps({"inputs": [{"name": "x", "datatype": "FP32",
                                                   "shape": ["2"], "data": [1]}]}).encode(),
                           None, "'shape' must be a list of integers"),
    "data not numbers": (json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a", "b", "c", "d"]},
        {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [1]}]}).encode(), None,
                         "'data' holds values that are not FP32"),
    "data too short": (json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]},
        {"name": "k", "datatype": "INT32", "shape": [1, 1], "data": [1]}]}).encode(), None,
                       "input 'x': 3 values in its JSON 'data', expected 4 for shape [1, 4]"),
}


def _malformed_body(kind: str, body: bytes | None, length: str | None) -> tuple[bytes, dict]:
  if body is not None:
    return body, {} if length is None else {"Inference-Header-Content-Length": length}
  x, k = good_inputs(1)
  inputs = [x, k]
  full, headers = as_http(inputs)
  if kind == "binary size past the data":
    return full[:-2], headers
  return full + b"\0\0\0\0", headers


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_bodies_get_400_and_the_server_keeps_serving(server, kind):
  _, api, _ = server
  raw, length, needle = MALFORMED[kind]
  body, headers = _malformed_body(kind, raw, length)
  status, _, answer = api.call("POST", "/v2/models/mock/infer", body, headers)
  assert status == 400 and needle in json.loads(answer)["error"], answer
  x, k = mock_rows(np.random.default_rng(0), 2)
  body, headers = as_http([tensor("x", "FP32", [2, 4], x.tobytes()),
                           tensor("k", "INT32", [2, 1], k.tobytes())], params={
                               "binary_data_output": False})
  status, _, answer = api.call("POST", "/v2/models/mock/infer", body, headers)
  assert status == 200
  assert json.loads(answer)["outputs"][0]["data"] == expected(x, k)[0].ravel().tolist()


def test_paths_methods_sizes_and_encodings(server):
  bg, api, _ = server
  status, _, body = api.get("/v2/nothing/here")
  assert status == 404 and "no endpoint" in json.loads(body)["error"]
  status, _, body = api.get("/v2/models/mock/infer")
  assert status == 405 and "takes POST" in json.loads(body)["error"]
  status, _, body = api.call("POST", "/v2/models/mock/infer", b"\x1f\x8b not gzip",
                             {"Content-Encoding": "gzip"})
  assert status == 400 and "does not inflate" in json.loads(body)["error"]
  status, _, body = api.call("POST", "/v2/models/mock/infer", b"{}", {"Content-Encoding": "br"})
  assert status == 415
  # A body over --max-message-bytes is refused from its Content-Length, before it is read.
  with socket.create_connection(("127.0.0.1", bg.server.http_port), timeout=10) as s:
    s.sendall(b"POST /v2/models/mock/infer HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: 999999999\r\n\r\n")
    reply = b""
    while b"exceeds the limit" not in reply and (chunk := s.recv(4096)):
      reply += chunk
  assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in reply
  assert api.get("/v2/health/ready")[0] == 200


def test_shed_load_and_expired_deadlines_get_503(tmp_path):
  with both_protocols(tmp_path / "repo", config={"max_queue_rows": 8},
                      engine_kwargs={"delay_s": 0.3}) as bg, \
      grpc.insecure_channel(bg.address) as ch:
    api, stub = Http(bg.server.http_port), pb_grpc.GRPCInferenceServiceStub(ch)
    x, k = np.ones((8, 4), np.float32), np.ones((8, 1), np.int32)
    body, headers = as_http([tensor("x", "FP32", [8, 4], x.tobytes()),
                             tensor("k", "INT32", [8, 1], k.tobytes())])
    post = lambda: api.call("POST", "/v2/models/mock/infer", body, headers)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      first = pool.submit(post)
      time.sleep(0.1)  # running, not queued, when the rest arrive
      rest = [pool.submit(post) for _ in range(3)]
      answers = [f.result() for f in [first, *rest]]
    shed = [json.loads(b)["error"] for s, _, b in answers if s == 503]
    assert shed and all("model mock" in m and "queue" in m for m in shed), answers
    assert sum(s == 200 for s, _, _ in answers) >= 2
    # Triton's `timeout` parameter (microseconds) expiring in the queue: the gRPC message.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      blocker = pool.submit(post)
      time.sleep(0.1)
      late_body, late_headers = as_http([tensor("x", "FP32", [1, 4], x[:1].tobytes()),
                                         tensor("k", "INT32", [1, 1], k[:1].tobytes())],
                                        params={"timeout": 50_000})
      status, _, answer = api.call("POST", "/v2/models/mock/infer", late_body, late_headers)
      blocker.result()
      blocker = pool.submit(post)
      time.sleep(0.1)
      with pytest.raises(grpc.RpcError) as e:
        stub.ModelInfer(mock_request(x[:1], k[:1], timeout=50_000))
      blocker.result()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (status, json.loads(answer)) == (503, {"error": e.value.details()})


def test_mutated_bodies_never_get_a_server_error(server):
  """Random corruptions of a valid binary request (bytes flipped, cut, header length off): every
  answer is a clean 200 or 4xx, never a 500, and the server keeps serving."""
  _, api, _ = server
  rng = np.random.default_rng(11)
  x, k = mock_rows(rng, 2)
  body, headers = as_http([tensor("x", "FP32", [2, 4], x.tobytes()),
                           tensor("k", "INT32", [2, 1], k.tobytes())])
  n = int(headers["Inference-Header-Content-Length"])
  statuses = set()
  for _ in range(150):
    mutated = bytearray(body)
    for pos in rng.integers(0, len(mutated), size=int(rng.integers(1, 4))):
      mutated[pos] = int(rng.integers(0, 256))
    if rng.random() < 0.3:
      mutated = mutated[:int(rng.integers(0, len(mutated)))]
    length = str(n + int(rng.integers(-3, 4))) if rng.random() < 0.3 else str(n)
    status, _, answer = api.call("POST", "/v2/models/mock/infer", bytes(mutated),
                                 {"Inference-Header-Content-Length": length})
    assert status in (200, 400, 404), (status, answer)
    statuses.add(status)
  assert 400 in statuses
  status, _, answer = api.call("POST", "/v2/models/mock/infer", body, headers)
  assert status == 200
