"""`xlaserve serve --devices 2 --sharding tensor` serving the tiny LM: tritonclient streaming and
the openai client get the model's own greedy tokens; per-device memory is reported."""

from __future__ import annotations

import re
import urllib.request

import openai
import pytest
import tritonclient.grpc as tc

from clientutil import stream_pieces
from models.decoder import greedy_reference
from models.tokenizer import ByteTokenizer
from procutil import serve

TOK = ByteTokenizer()
PROMPTS = ["Acme shoes:", "Cheap flights to", "Northwind rain jackets: save", "x"]


@pytest.fixture(scope="module")
def tp_server(tiny_bundle):
  proc = serve(["--model-repository", str(tiny_bundle.parent.parent), "--grpc-port", "0",
                "--http-port", "0", "--metrics-port", "0", "--compile-cache", "none",
                "--devices", "2", "--sharding", "tensor"])
  try:
    yield proc
  finally:
    proc.kill()


def _memory(text: str, kind: str, device: str) -> float:
  """xlaserve_model_memory_bytes of the decoder for `kind` on `device` (a Prometheus sample)."""
  pattern = (r'^xlaserve_model_memory_bytes\{(?=[^}]*model="decoder")(?=[^}]*version="1")'
             rf'(?=[^}}]*kind="{kind}")(?=[^}}]*device="{device}")[^}}]*\}} (\S+)$')
  m = re.search(pattern, text, re.M)
  assert m, (kind, device)
  return float(m.group(1))


def test_tensor_parallel_server_streams_the_greedy_tokens(tp_server, tiny_model):
  n = 20
  want = greedy_reference(tiny_model, [TOK.encode(p) for p in PROMPTS], max_new_tokens=n,
                          eos_id=TOK.eos_id)
  text = {p: TOK.decode(ids) for p, ids in zip(PROMPTS, want)}
  assert ("placement: decoder: tensor over 2 devices; KV cache split by kv heads (k_pages, v_pages);"
          " replicated where they do not divide 2: vocab (259)") in tp_server.text
  streamed = dict(zip(PROMPTS, (b"".join(x) for x in stream_pieces(
      tp_server.address, "decoder", [p.encode() for p in PROMPTS], {"max_tokens": n}))))
  for p in PROMPTS:
    assert streamed[p] == TOK.decode_bytes(want[PROMPTS.index(p)]), p
  client = openai.OpenAI(base_url=f"{tp_server.http_url}/v1", api_key="x", max_retries=0,
                         timeout=60)
  res = client.completions.create(model="decoder", prompt=PROMPTS, max_tokens=n, temperature=0)
  assert [ch.text for ch in res.choices] == [text[p] for p in PROMPTS]
  chunks = client.completions.create(model="decoder", prompt=PROMPTS[0], max_tokens=n,
                                     temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in chunks) == text[PROMPTS[0]]


def test_tensor_parallel_server_reports_memory_per_device(tp_server):
  with tc.InferenceServerClient(tp_server.address) as c:
    usage = c.get_inference_statistics("decoder").model_stats[0].memory_usage
  assert sorted(u.id for u in usage) == [0, 1] and {u.type for u in usage} == {"CPU"}
  text = urllib.request.urlopen(tp_server.metrics_url, timeout=10).read().decode()
  kv = [_memory(text, "kv_cache", d) for d in ("0", "1")]
  whole = 2 * 2 * 2 * 64 * 8 * 16 * 4  # k and v pages [layers, kv_heads, pages, size, dim] f32
  assert kv == [whole / 2, whole / 2]
  params = [_memory(text, "params", d) for d in ("0", "1")]
  assert params[0] == params[1] > 0
  for u in usage:
    assert u.byte_size >= whole / 2 + params[0]
