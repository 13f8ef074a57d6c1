"""The generative model over real gRPC: tritonclient streaming and plain ModelInfer."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from clientutil import serving, stream_pieces, triton_inputs
from models.decoder import greedy_reference
from models.tokenizer import ByteTokenizer

PROMPTS = ["Acme shoes:", "Cheap flights to", "x"]


@pytest.fixture(scope="module")
def lm_server(tiny_bundle):
  with serving(tiny_bundle.parent.parent) as bg:  # <repo>/decoder/1
    yield bg


def _text_input(prompt: str) -> tc.InferInput:
  (t,) = triton_inputs({"text_input": np.array([prompt.encode()], dtype=object)})
  assert t.datatype() == "BYTES"
  return t


def _expected(model, prompt: str, n: int) -> bytes:
  tok = ByteTokenizer()
  ids = greedy_reference(model, [tok.encode(prompt)], max_new_tokens=n, eos_id=tok.eos_id)[0]
  return tok.decode(ids) if isinstance(tok.decode(ids), bytes) else tok.decode(ids).encode()


def test_metadata_says_decoupled_bytes_model(lm_server):
  c = tc.InferenceServerClient(lm_server.address)
  assert c.is_model_ready("decoder")
  md = c.get_model_metadata("decoder")
  assert [(t.name, t.datatype) for t in md.inputs] == [("text_input", "BYTES")]
  assert [(t.name, t.datatype) for t in md.outputs] == [("text_output", "BYTES")]
  assert c.get_model_config("decoder").config.model_transaction_policy.decoupled


def test_model_infer_returns_whole_greedy_completion(lm_server, tiny_model):
  c = tc.InferenceServerClient(lm_server.address)
  for prompt in PROMPTS:
    res = c.infer("decoder", [_text_input(prompt)], parameters={"max_tokens": 12})
    got = res.as_numpy("text_output")[0]
    assert got == _expected(tiny_model, prompt, 12), prompt


def test_streaming_prints_token_by_token_and_equals_greedy(lm_server, tiny_model):
  # three generations interleaved on one stream
  streamed = stream_pieces(lm_server.address, "decoder", [p.encode() for p in PROMPTS],
                           {"max_tokens": 16})
  for pieces, prompt in zip(streamed, PROMPTS):
    assert len(pieces) > 1  # streamed in several responses, not one
    assert b"".join(pieces) == _expected(tiny_model, prompt, 16)


def test_bad_sampling_parameter_is_invalid_argument(lm_server):
  c = tc.InferenceServerClient(lm_server.address)
  with pytest.raises(InferenceServerException, match="top_p"):
    c.infer("decoder", [_text_input("hi")], parameters={"top_p": "1.5"})
  with pytest.raises(InferenceServerException, match="not a float"):
    c.infer("decoder", [_text_input("hi")], parameters={"temperature": "hot"})
  seeded = [c.infer("decoder", [_text_input("Acme")], parameters={
      "max_tokens": 8, "temperature": "0.9", "top_p": "0.95", "seed": 7}).as_numpy("text_output")[0]
      for _ in range(2)]
  assert seeded[0] == seeded[1]  # string-typed floats are parsed; the seed makes it repeatable
  res = c.infer("decoder", [_text_input("hi")], parameters={"max_tokens": 2})
  assert len(res.as_numpy("text_output")[0]) <= 8


def test_cancelled_stream_frees_pages(lm_server):
  svc = lm_server.server.repository.get("decoder").runner.service
  c = tc.InferenceServerClient(lm_server.address)
  got_one = threading.Event()
  c.start_stream(callback=lambda result, error: got_one.set())
  c.async_stream_infer("decoder", [_text_input("Acme shoes:")],
                       parameters={"max_tokens": 100, "ignore_eos": True})
  assert got_one.wait(60)
  c.stop_stream(cancel_requests=True)
  deadline = time.time() + 30
  while svc.stats()["kv_pages_used"] and time.time() < deadline:
    time.sleep(0.05)
  st = svc.stats()
  assert st["kv_pages_used"] == 0 and st["running"] == 0


def test_generation_metrics_exposed(lm_server):
  c = tc.InferenceServerClient(lm_server.address)
  c.infer("decoder", [_text_input("Acme")], parameters={"max_tokens": 4, "ignore_eos": True})
  text = lm_server.server.metrics.exposition().decode()
  line = next(l for l in text.splitlines()
              if l.startswith('vllm:time_to_first_token_seconds_count{model_name="decoder/1"}'))
  assert float(line.split()[-1]) >= 1
  tokens = next(l for l in text.splitlines()
                if l.startswith('vllm:generation_tokens_total{model_name="decoder/1"}'))
  assert float(tokens.split()[-1]) >= 4
  assert 'vllm:num_requests_running{model_name="decoder/1"}' in text
  assert 'vllm:gpu_cache_usage_perc{model_name="decoder/1"}' in text


def test_shared_prefix_streams_hit_the_prefix_cache(lm_server, tiny_model):
  """Streamed over tritonclient: prompts sharing a long instruction equal greedy, and the
  second and later ones are served from the prefix cache (Prometheus counters)."""
  instruction = "Write one line of ad copy for this product. Product: "  # 6 full pages of 8
  prompts = [instruction + p for p in ("shoes", "tea sets", "socks")]
  metric = 'vllm:prefix_cache_hits_total{model_name="decoder/1"}'

  def hits() -> float:
    text = lm_server.server.metrics.exposition().decode()
    return float(next(l for l in text.splitlines() if l.startswith(metric)).split()[-1])

  before = hits()
  c = tc.InferenceServerClient(lm_server.address)
  results: queue.Queue = queue.Queue()
  c.start_stream(callback=lambda result, error: results.put((result, error)))
  got = {}
  try:
    for i, prompt in enumerate(prompts):  # one at a time: the first fills the cache
      c.async_stream_infer("decoder", [_text_input(prompt)], request_id=str(i),
                           parameters={"max_tokens": 8})
      pieces = []
      while True:
        result, error = results.get(timeout=60)
        assert error is None, error
        out = result.as_numpy("text_output")
        pieces += [] if out is None else [out[0]]
        if result.get_response().parameters["triton_final_response"].bool_param:
          break
      got[prompt] = b"".join(pieces)
  finally:
    c.stop_stream()
  for prompt in prompts:
    assert got[prompt] == _expected(tiny_model, prompt, 8), prompt
  assert hits() - before >= 2 * 48
  text = lm_server.server.metrics.exposition().decode()
  assert 'vllm:prefix_cache_queries_total{model_name="decoder/1"}' in text


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_int8_weight_bundle_serves_and_is_smaller(tiny_model, tiny_bundle, tmp_path):
  """int8 Dense weights (MLP, head) through the quantization path: fewer bytes, and it serves."""
  import dataclasses

  from bundle import read_manifest
  from export.generative import GenerativeExportConfig, export_generative

  config = dataclasses.replace(GenerativeExportConfig.tiny(), weights="int8",
                               prefill_lengths=(128,))
  path = export_generative(tiny_model, tmp_path / "decoder_w8" / "1", config, name="decoder_w8")
  q, f = read_manifest(path), read_manifest(tiny_bundle)
  nbytes = lambda m: sum(np.prod(p.shape) * np.dtype(p.dtype).itemsize for p in m.params)
  assert q.quantization == "int8" and nbytes(q) < 0.6 * nbytes(f)
  assert any(p.dtype == "int8" for p in q.params)
  with serving(tmp_path) as bg:
    c = tc.InferenceServerClient(bg.address)
    out = c.infer("decoder_w8", [_text_input("Acme shoes:")],
                  parameters={"max_tokens": 12, "ignore_eos": True}).as_numpy("text_output")[0]
    assert len(out) >= 12  # 12 byte tokens (a held-back stop match is impossible: no stops)
    # Trained weights: the int8 model's greedy continuation starts like the float one.
    ref = _expected(tiny_model, "Acme shoes:", 12)
    assert out[:4] == ref[:4]
