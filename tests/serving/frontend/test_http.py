"""The KServe v2 HTTP/REST front end on 127.0.0.1 driven by the unmodified `tritonclient.http`,
raw HTTP and `perf_analyzer -i http`, checked against the MockEngine worked by hand and against the
gRPC answers of the same server."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th

from clientutil import infer as grpc_infer
from httputil import Http, both_protocols, mock_completion
from servingutil import expected, mock_rows

ROOT = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  with both_protocols(tmp_path_factory.mktemp("http") / "repo", generate=True) as bg:
    yield bg


@pytest.fixture
def client(server):
  with th.InferenceServerClient(f"127.0.0.1:{server.server.http_port}") as c:
    yield c


def http_inputs(arrays: dict[str, np.ndarray], binary: bool) -> list[th.InferInput]:
  out = []
  for name, arr in arrays.items():
    i = th.InferInput(name, list(arr.shape), th.np_to_triton_dtype(arr.dtype))
    i.set_data_from_numpy(arr, binary_data=binary)
    out.append(i)
  return out


@pytest.mark.parametrize("binary_in,binary_out", [(True, True), (False, False), (True, False),
                                                  (False, True)])
def test_tritonclient_http_gives_the_reference_and_the_grpc_answer(server, client, binary_in,
                                                                   binary_out):
  rng = np.random.default_rng(int(binary_in) * 2 + int(binary_out))
  grpc = tg.InferenceServerClient(server.address)
  for n in (1, 3, 8, 19):  # 19 rows: split across batches of the largest bucket (8)
    x, k = mock_rows(rng, n)
    outs = [th.InferRequestedOutput(name, binary_data=binary_out) for name in ("y", "z")]
    res = client.infer("mock", http_inputs({"x": x, "k": k}, binary_in), outputs=outs,
                       request_id=f"req-{n}")
    assert res.get_response()["id"] == f"req-{n}"
    ey, ez = expected(x, k)
    want = grpc_infer(grpc, "mock", {"x": x, "k": k}, ("y", "z"))
    for name, ref in (("y", ey), ("z", ez)):
      got = res.as_numpy(name)
      assert got.dtype == np.float32 and got.shape == ref.shape
      np.testing.assert_array_equal(got, ref)
      np.testing.assert_array_equal(got, want[name])
  # The default (no outputs named): every output, binary (tritonclient asks binary_data_output).
  res = client.infer("mock", http_inputs({"x": x, "k": k}, binary_in))
  assert all("binary_data_size" in o["parameters"] for o in res.get_response()["outputs"])
  np.testing.assert_array_equal(res.as_numpy("y"), ey)


def test_json_only_request_and_answer_by_hand(server):
  """Plain JSON, nested data, no tritonclient: the KServe v2 document format itself."""
  api = Http(server.server.http_port)
  body = {"id": "7", "inputs": [
      {"name": "x", "shape": [2, 4], "datatype": "FP32",
       "data": [[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]]},
      {"name": "k", "shape": [2, 1], "datatype": "INT32", "data": [3, -1]}],
      "outputs": [{"name": "y"}]}
  status, out = api.post_json("/v2/models/mock/infer", body)
  assert status == 200, out
  assert out == {"model_name": "mock", "model_version": "1", "id": "7", "outputs": [
      {"name": "y", "datatype": "FP32", "shape": [2, 1], "data": [21.0, 5.0]}]}  # 2*10+1, 2*2+1
  status, out = api.post_json("/v2/models/mock/versions/1/infer", body)
  assert status == 200 and out["model_version"] == "1"


def test_bytes_tensors_as_json_strings_and_binary(server, client):
  """BYTES in and out both ways, through the generative model's whole-completion path."""
  prompts = np.array([b"ab", b"Acme shoes:", b"xy"], dtype=object)
  for binary in (True, False):
    (t,) = http_inputs({"text_input": prompts}, binary)
    assert t.datatype() == "BYTES"
    res = client.infer("lm", [t], parameters={"max_tokens": 4},
                       outputs=[th.InferRequestedOutput("text_output", binary_data=binary)])
    got = [v.encode() if isinstance(v, str) else bytes(v) for v in res.as_numpy("text_output")]
    assert got == [mock_completion(p, 4) for p in prompts], binary  # JSON gives str back


def test_every_metadata_endpoint(server, client):
  port = server.server.http_port
  api = Http(port)
  assert client.is_server_live() and client.is_server_ready()
  assert client.is_model_ready("mock") and client.is_model_ready("mock", "1")
  assert not client.is_model_ready("nope") and not client.is_model_ready("mock", "2")
  assert "statistics" in client.get_server_metadata()["extensions"]
  md = client.get_model_metadata("mock")
  assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [
      ("x", "FP32", [-1, 4]), ("k", "INT32", [-1, 1])]
  assert client.get_model_metadata("mock", "1")["versions"] == ["1"]
  cfg = client.get_model_config("mock")
  assert [i["dims"] for i in cfg["input"]] == [[4], [1]]  # numbers, as Triton writes them
  assert cfg["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8]
  assert client.get_model_config("lm")["model_transaction_policy"]["decoupled"] is True
  assert client.get_model_repository_index() == [
      {"name": "lm", "version": "1", "state": "READY"},
      {"name": "mock", "version": "1", "state": "READY"}]
  before = client.get_inference_statistics("mock")["model_stats"][0]["inference_count"]
  x, k = mock_rows(np.random.default_rng(5), 3)
  client.infer("mock", http_inputs({"x": x, "k": k}, True))
  stats = client.get_inference_statistics("mock", "1")["model_stats"][0]
  assert stats["inference_count"] == before + 3 and stats["name"] == "mock"
  assert {s["name"] for s in client.get_inference_statistics()["model_stats"]} == {"mock", "lm"}
  status, headers, body = api.get("/v2/health/live")
  assert (status, body) == (200, b"")
  status, headers, body = api.get("/v2/models/stats")
  assert status == 200 and headers["content-type"] == "application/json"


def test_unload_and_load_over_http(tmp_path):
  with both_protocols(tmp_path / "repo") as bg:
    c = th.InferenceServerClient(f"127.0.0.1:{bg.server.http_port}")
    grpc = tg.InferenceServerClient(bg.address)
    c.unload_model("mock")
    assert not c.is_model_ready("mock") and not grpc.is_model_ready("mock")
    c.load_model("mock")
    assert c.is_model_ready("mock") and grpc.is_model_ready("mock")
    with pytest.raises(th.InferenceServerException) as e:
      c.load_model("nope")
    assert e.value.status() == "404"


def test_generate_and_generate_stream(server):
  api = Http(server.server.http_port)
  status, out = api.post_json("/v2/models/lm/generate",
                              {"text_input": "Acme", "parameters": {"max_tokens": 5}})
  assert status == 200
  assert out == {"model_name": "lm", "model_version": "1",
                 "text_output": mock_completion(b"Acme", 5).decode()}
  status, headers, body = api.call("POST", "/v2/models/lm/generate_stream",
                                   b'{"text_input": "ab", "parameters": {"max_tokens": 4}}')
  assert status == 200 and headers["content-type"] == "text/event-stream"
  events = [line for line in body.decode().split("\n\n") if line]
  assert events == [f'data: {{"model_name":"lm","model_version":"1","text_output":"{c}"}}'
                    for c in "cdef"]
  # A predict model answers generate too: inputs by name, the batch dimension implied.
  status, out = api.post_json("/v2/models/mock/generate", {"x": [1, 2, 3, 4], "k": 2})
  assert (status, out["y"], out["z"]) == (200, 21.0, [2.0, 4.0, 6.0, 8.0])
  status, out = api.post_json("/v2/models/lm/generate", {"text_input": "ab",
                                                         "parameters": {"max_tokens": "x"}})
  assert status == 400 and "max_tokens" in out["error"]


def test_compressed_request_and_response(server, client):
  x, k = mock_rows(np.random.default_rng(9), 4)
  for req_alg, resp_alg in (("gzip", "deflate"), ("deflate", "gzip")):
    res = client.infer("mock", http_inputs({"x": x, "k": k}, True),
                       request_compression_algorithm=req_alg,
                       response_compression_algorithm=resp_alg)
    np.testing.assert_array_equal(res.as_numpy("z"), expected(x, k)[1])


def _perf_analyzer_env() -> tuple[pathlib.Path, dict[str, str]] | str:
  """The perf_analyzer binary and its environment, or why it cannot run here."""
  pa = pathlib.Path(sys.executable).parent / "perf_analyzer"
  libs = ROOT / "bench_out" / "pa_libs"
  if not pa.exists():
    return "perf_analyzer is not installed (tritonclient==2.41.0 ships it)"
  if not (libs / "libb64.so.0d").exists() or not (libs / "libcudart.so.12").exists():
    return f"perf_analyzer's libraries are not in {libs} (benchmarks/perf_analyzer.sh fetches them)"
  env = dict(os.environ, LD_LIBRARY_PATH=f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}")
  probe = subprocess.run([str(pa), "--version"], capture_output=True, text=True, env=env,
                         timeout=30)
  if probe.returncode != 0 and "error while loading shared libraries" in probe.stderr:
    return f"perf_analyzer cannot run: {probe.stderr.strip()}"
  return pa, env


def test_perf_analyzer_http_smoke(server):
  found = _perf_analyzer_env()
  if isinstance(found, str):
    pytest.skip(found)
  pa, env = found
  out = subprocess.run(
      [str(pa), "-m", "mock", "-u", f"127.0.0.1:{server.server.http_port}", "-i", "http",
       "-b", "2", "--concurrency-range", "2:2", "--measurement-interval", "500",
       "--input-data", "zero",
       "--max-trials", "3", "--stability-percentage", "100"],
      capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "Throughput:" in out.stdout and "Server:" in out.stdout, out.stdout
