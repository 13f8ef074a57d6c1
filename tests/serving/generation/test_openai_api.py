"""The OpenAI-compatible API (/v1) on the real server, driven by the unmodified `openai` client.

The trained tiny decoder is served once (native HTTP front end, relaying /v1 to Python) and
checked against independent references: the model's own full forward (greedy tokens, log-softmax),
the byte tokenizer's counts, and Triton's generate endpoint and gRPC streaming on the same
server. Disconnects are checked on the exact mock generation engine slowed down, through the
server's own metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import pathlib
import queue
import socket
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import tritonclient.grpc as tc
from flax import nnx

from bundle import Manifest, Signature, write_bundle
from clientutil import serving, triton_inputs
from models.decoder import greedy_reference
from models.tokenizer import ByteTokenizer
from serving.generation.mock_engine import MockEngine
from serving.generation.runner import TEXT_INPUT, TEXT_OUTPUT, GenerationRunner
from serving.generation.service import GenerationService, ServiceConfig
from serving.kinds import ModelKind, generation_metrics, standard_kinds
from serving.server import BackgroundServer, Server, ServerConfig

TOK = ByteTokenizer()
PROMPTS = ["Acme shoes:", "Cheap flights to"]
CHAT = [{"role": "system", "content": "Write ads."}, {"role": "user", "content": "shoes"}]
RENDERED = "<|system|>\nWrite ads.\n<|user|>\nshoes\n<|assistant|>\n"  # the documented template


@pytest.fixture(scope="module")
def lm(tiny_bundle):
  with serving(tiny_bundle.parent.parent, http_port=0) as bg:  # <repo>/decoder/1
    yield bg


def client(bg, **kw) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"http://127.0.0.1:{bg.server.http_port}/v1", api_key="x",
                       max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def greedy(tiny_model):
  """greedy(prompt, n): the model's own greedy tokens (full forward, no cache), all prompts in
  one call (one compile); n tokens are a prefix of 24."""
  prompts = [*PROMPTS, "Acme", RENDERED]
  refs = greedy_reference(tiny_model, [TOK.encode(p) for p in prompts], max_new_tokens=24,
                          eos_id=TOK.eos_id)
  return lambda prompt, n: refs[prompts.index(prompt)][:n]


def post(bg, path: str, body: bytes) -> tuple[int, dict]:
  conn = http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=60)
  try:
    conn.request("POST", path, body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())
  finally:
    conn.close()


def relayed(bg) -> float:
  """Requests the native HTTP front end relayed to the Python app (its own metric)."""
  for line in bg.server.metrics.exposition().decode().splitlines():
    if line.startswith('xlaserve_native_calls_total{path="http_relayed"}'):
      return float(line.split()[-1])
  return 0.0


def get(bg, path: str) -> int:
  conn = http.client.HTTPConnection("127.0.0.1", bg.server.http_port, timeout=60)
  try:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status
  finally:
    conn.close()


def test_models_and_greedy_completions_equal_the_reference_and_triton(lm, greedy):
  c = client(lm)
  since = relayed(lm)
  assert [m.id for m in c.models.list().data] == ["decoder"]
  assert c.models.retrieve("decoder").id == "decoder"
  res = c.completions.create(model="decoder", prompt=PROMPTS, max_tokens=12, temperature=0)
  assert [ch.index for ch in res.choices] == [0, 1]
  for prompt, ch in zip(PROMPTS, res.choices):
    ids = greedy(prompt, 12)
    assert ch.text == TOK.decode(ids)
    assert ch.finish_reason == ("stop" if ids[-1] == TOK.eos_id else "length")
    status, out = post(lm, "/v2/models/decoder/generate", json.dumps(
        {"text_input": prompt, "parameters": {"max_tokens": 12}}).encode())
    assert status == 200 and out["text_output"] == ch.text  # Triton's endpoint agrees
  want = [greedy(p, 12) for p in PROMPTS]
  assert res.usage.prompt_tokens == sum(len(TOK.encode(p)) for p in PROMPTS)
  assert res.usage.completion_tokens == sum(len(ids) for ids in want)
  assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
  assert relayed(lm) >= since + 5  # the default (native) HTTP front end relayed /v1 and /v2


def test_streamed_completion_and_chat(lm, greedy):
  c = client(lm)
  chunks = list(c.completions.create(model="decoder", prompt="Acme", max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True}, stream=True,
                                     stream_options={"include_usage": True}))
  texts = [ch.choices[0].text for ch in chunks if ch.choices]
  assert len(texts) > 1 and "".join(texts) == TOK.decode(greedy("Acme", 20))
  assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens == 5
  assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
  want = TOK.decode(greedy(RENDERED, 16))
  res = c.chat.completions.create(model="decoder", messages=CHAT, max_completion_tokens=16,
                                  temperature=0)
  assert res.choices[0].message.role == "assistant" and res.choices[0].message.content == want
  assert res.usage.prompt_tokens == len(TOK.encode(RENDERED))
  stream = c.chat.completions.create(model="decoder", messages=CHAT, max_tokens=16,
                                     temperature=0, stream=True)
  deltas = [ch.choices[0].delta for ch in stream]
  assert deltas[0].role == "assistant"
  assert "".join(d.content or "" for d in deltas) == want


def test_n_choices_with_seeds_and_stop_strings(lm, greedy):
  c = client(lm)
  kw = dict(model="decoder", prompt="Acme", max_tokens=16, temperature=1.0, top_p=0.95,
            extra_body={"ignore_eos": True})
  two = c.completions.create(n=2, seed=5, **kw)
  again = c.completions.create(n=2, seed=5, **kw)
  assert [ch.text for ch in two.choices] == [ch.text for ch in again.choices]
  # Choice j of a seeded request draws with seed + j (documented), so it is reproducible alone.
  assert c.completions.create(n=1, seed=6, **kw).choices[0].text == two.choices[1].text
  assert two.usage.completion_tokens == 32 and two.usage.prompt_tokens == 5
  greedy_text = TOK.decode(greedy("Acme", 24))
  stop = greedy_text[6:8]
  res = c.completions.create(model="decoder", prompt="Acme", max_tokens=24, temperature=0,
                             stop=[stop, "\x00never"])
  assert res.choices[0].text == greedy_text[:greedy_text.index(stop)]
  assert res.choices[0].finish_reason == "stop"


def test_logprobs_match_the_models_log_softmax(lm, tiny_model):
  c = client(lm)
  res = c.completions.create(model="decoder", prompt="Acme", max_tokens=8, temperature=0,
                             logprobs=3, extra_body={"ignore_eos": True})
  lp = res.choices[0].logprobs
  seq = TOK.encode("Acme") + list(res.choices[0].text.encode())
  logits = nnx.jit(lambda m, x: m(x))(tiny_model, jnp.asarray([seq]))[0]  # the full forward
  ref = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  assert len(lp.tokens) == len(lp.token_logprobs) == 8
  for i, (chosen, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
    row = ref[len(TOK.encode("Acme")) - 1 + i]
    assert len(top) == 3 and max(top.values()) == chosen  # greedy: the best token
    assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    np.testing.assert_allclose(chosen, row.max(), atol=2e-3)
    np.testing.assert_allclose(sorted(top.values(), reverse=True), np.sort(row)[::-1][:3],
                               atol=2e-3)
  chat = c.chat.completions.create(model="decoder", messages=[{"role": "user", "content": "x"}],
                                   max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].logprobs.content
  assert bytes(b for e in content for b in e.bytes) == chat.choices[0].message.content.encode()
  assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == e.logprob
             for e in content)


def test_errors_in_openai_format_and_the_server_keeps_serving(lm):
  c = client(lm)
  with pytest.raises(openai.NotFoundError):
    c.completions.create(model="nope", prompt="x")
  for bad in ({"temperature": 5}, {"top_p": 0}, {"n": 0}, {"logprobs": 9},
              {"extra_body": {"frequency_penalty": 1.0}}, {"extra_body": {"foo": 1}}):
    with pytest.raises(openai.BadRequestError):
      c.completions.create(model="decoder", prompt="x", **bad)
  with pytest.raises(openai.BadRequestError):
    c.chat.completions.create(model="decoder", messages=[{"role": "robot", "content": "x"}])
  status, out = post(lm, "/v1/completions", b'{"model": "decoder", "prompt": 3}')
  assert status == 400 and out["error"]["param"] == "prompt"
  assert set(out["error"]) == {"message", "type", "param", "code"}
  assert out["error"]["type"] == "invalid_request_error"
  for body in (b"{not json", b"[]", b'{"model": "decoder", "prompt": "' + b"x" * 400 + b'"}'):
    status, out = post(lm, "/v1/completions", body)
    assert status == 400 and out["error"]["message"], body
  status, out = post(lm, "/v1/embeddings", b"{}")
  assert status == 404 and out["error"]["code"] == "not_found"
  assert c.completions.create(model="decoder", prompt="x", max_tokens=2).usage.prompt_tokens == 2


def test_tritonclient_grpc_streaming_on_the_same_server(lm, greedy):
  results: queue.Queue = queue.Queue()
  g = tc.InferenceServerClient(lm.address)
  g.start_stream(callback=lambda result, error: results.put((result, error)))
  try:
    (t,) = triton_inputs({"text_input": np.array([b"Acme"], dtype=object)})
    g.async_stream_infer("decoder", [t], parameters={"max_tokens": 10})
    pieces = []
    while True:
      result, error = results.get(timeout=60)
      assert error is None, error
      out = result.as_numpy("text_output")
      if out is not None:
        pieces.append(out[0])
      if result.get_response().parameters["triton_final_response"].bool_param:
        break
  finally:
    g.stop_stream()
  want = TOK.decode(greedy("Acme", 10))
  assert b"".join(pieces).decode() == want
  assert client(lm).completions.create(model="decoder", prompt="Acme", max_tokens=10,
                                       temperature=0).choices[0].text == want


# -- disconnects, overload, failures and bad input on the exact mock engine ---------------------
# It continues each byte with the next one ("ab" -> "cdef..."), 20 ms a step, and fails any step
# whose sequence holds the byte 0x01 (the prompt "\x00" reaches it on its second step).


@contextlib.contextmanager
def mock_server(repo: pathlib.Path, frontend: str) -> Iterator[BackgroundServer]:
  """The server over one generate model `lm` on the slowed mock engine (HTTP: `frontend`)."""
  manifest = Manifest(name="lm", version=1, kind="generate", jax_version="0.10.2",
                      signatures={"serve": Signature("serve", (TEXT_INPUT,), (TEXT_OUTPUT,), {})},
                      params=(), batch_buckets=(1,))
  write_bundle(repo / "lm" / "1", manifest, [], {})
  kinds = standard_kinds()
  kinds["generate"] = ModelKind(lambda spec: GenerationRunner(
      spec.name, GenerationService(MockEngine(delay_s=0.02, fail=lambda kind, seq: 1 in seq),
                                   config=ServiceConfig(max_waiting=8))),
      generation_metrics)
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0, http_port=0,
                                            metrics_port=-1, http_frontend=frontend),
                               kinds=kinds)).start()
  try:
    yield bg
  finally:
    bg.stop()


@pytest.fixture(scope="module", params=["native", "python"])
def slow_lm(request, tmp_path_factory):
  with mock_server(tmp_path_factory.mktemp("openai") / "repo", request.param) as bg:
    yield bg


def metric(bg, name: str) -> float:
  for line in bg.server.metrics.exposition().decode().splitlines():
    if line.startswith(f'{name}{{model_name="lm/1"}}'):
      return float(line.split()[-1])
  raise AssertionError(f"no {name}")


def wait_freed(bg, cancelled_before: float) -> None:
  deadline = time.time() + 10
  while time.time() < deadline:
    if (metric(bg, "xlaserve:generation_requests_cancelled_total") > cancelled_before
        and metric(bg, "xlaserve:kv_cache_pages_used") == 0
        and metric(bg, "vllm:num_requests_running") == 0):
      return
    time.sleep(0.02)
  raise AssertionError("the disconnected request still holds its slot or pages")


def test_disconnect_cancels_and_frees_pages(slow_lm):
  c = client(slow_lm)
  res = c.completions.create(model="lm", prompt="ab", max_tokens=4, temperature=0)
  assert res.choices[0].text == "cdef" and res.usage.completion_tokens == 4
  before = metric(slow_lm, "xlaserve:generation_requests_cancelled_total")
  stream = c.completions.create(model="lm", prompt="ab", max_tokens=50, temperature=0,
                                stream=True)
  first = next(iter(stream))
  assert first.choices[0].text == "c"
  assert metric(slow_lm, "xlaserve:kv_cache_pages_used") > 0
  stream.close()  # ~1 s of generation left
  wait_freed(slow_lm, before)
  before = metric(slow_lm, "xlaserve:generation_requests_cancelled_total")
  body = json.dumps({"model": "lm", "messages": [{"role": "user", "content": "a"}],
                     "max_tokens": 50, "n": 2}).encode()
  with socket.create_connection(("127.0.0.1", slow_lm.server.http_port)) as s:
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
              b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.time() + 10
    while metric(slow_lm, "vllm:num_requests_running") < 2 and time.time() < deadline:
      time.sleep(0.01)
  wait_freed(slow_lm, before + 1)  # both choices cancelled


def test_full_queue_is_429_and_frees_what_it_started(slow_lm):
  c = client(slow_lm)
  before = metric(slow_lm, "xlaserve:generation_requests_cancelled_total")
  with pytest.raises(openai.RateLimitError):  # 16 choices, room for 8 waiting
    c.completions.create(model="lm", prompt="ab", max_tokens=40, n=16)
  wait_freed(slow_lm, before + 7)  # the 8 it had queued are cancelled
  assert c.completions.create(model="lm", prompt="ab", max_tokens=3).choices[0].text == "cde"


BAD = [b"", b"null", b'{"model": 1, "prompt": "x"}', b'{"prompt": "x"}',
       b'{"model": "lm", "prompt": []}', b'{"model": "lm", "prompt": [1, 2]}',
       b'{"model": "lm", "prompt": "x", "stop": 3}', b'{"model": "lm", "prompt": "x", "stop": [""]}',
       b'{"model": "lm", "prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i"]}',
       b'{"model": "lm", "prompt": "x", "logprobs": true}', b'{"model": "lm", "prompt": "x", "n": 17}',
       b'{"model": "lm", "prompt": "x", "max_tokens": 0}', b'{"model": "lm", "prompt": "x", "seed": 1.5}',
       b'{"model": "lm", "prompt": "x", "top_k": -2}', b'{"model": "lm", "prompt": "x", "stream": "yes"}',
       b'{"model": "lm", "prompt": "x", "stream_options": {"include_usage": true}}',
       b'{"model": "lm", "prompt": "x", "temperature": "hot"}', b'{"model": "lm", "prompt": "x", "echo": true}',
       b'{"model": "lm", "prompt": "x", "best_of": 3}', b'{"model": "lm", "prompt": "' + b"x" * 80 + b'"}']
BAD_CHAT = [b'{"model": "lm", "messages": []}', b'{"model": "lm", "messages": "hi"}',
            b'{"model": "lm", "messages": [{"role": "user", "content": 5}]}',
            b'{"model": "lm", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            b'{"model": "lm", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            b'{"model": "lm", "messages": [{"role": "user", "content": "x"}], "logprobs": true,'
            b' "top_logprobs": 21}',
            b'{"model": "lm", "messages": [{"role": "user", "content": "x"}], "tools": [{"a": 1}]}']


def test_bad_input_is_a_400_in_openai_format_and_breaks_nothing(slow_lm):
  for path, bodies in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
    for body in bodies:
      status, out = post(slow_lm, path, body)
      assert status == 400, (body, out)
      assert set(out["error"]) == {"message", "type", "param", "code"}, out
      assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]
  conn = http.client.HTTPConnection("127.0.0.1", slow_lm.server.http_port, timeout=30)
  conn.request("GET", "/v1/completions")
  resp = conn.getresponse()
  assert resp.status == 405 and json.loads(resp.read())["error"]["message"]
  conn.close()
  assert client(slow_lm).completions.create(model="lm", prompt="ab", max_tokens=2).choices[0].text == "cd"


def test_engine_failure_is_a_500_or_a_last_error_event(slow_lm):
  c = client(slow_lm)
  with pytest.raises(openai.InternalServerError, match="injected"):
    c.completions.create(model="lm", prompt="\x00", max_tokens=8)
  stream = c.completions.create(model="lm", prompt="\x00", max_tokens=8, stream=True)
  with pytest.raises(openai.APIError, match="injected"):
    for chunk in stream:  # the first piece, then the error event
      assert chunk.choices[0].text == "\x01"
  assert c.completions.create(model="lm", prompt="ab", max_tokens=2).choices[0].text == "cd"


def test_shutdown_finishes_the_stream_in_flight_and_refuses_new_requests_503(tmp_path):
  with mock_server(tmp_path / "repo", "native") as bg:
    c = client(bg)
    stream = iter(c.completions.create(model="lm", prompt=" ", max_tokens=50, stream=True))
    first = next(stream).choices[0].text
    bg.server.request_stop()
    deadline = time.time() + 5
    while time.time() < deadline and get(bg, "/v2/health/ready") == 200:
      time.sleep(0.02)
    with pytest.raises(openai.InternalServerError) as e:
      c.completions.create(model="lm", prompt="ab", max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["type"] == "server_error"
    text = first + "".join(ch.choices[0].text for ch in stream if ch.choices)
    assert text == bytes(range(0x21, 0x21 + 50)).decode()  # "!\"#$%..."
