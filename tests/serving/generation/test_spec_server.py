"""Speculative decoding behind the real server: the `openai` client (SSE), tritonclient gRPC
streaming and HTTP generate_stream get the model's own greedy text, stop strings cut it as
without speculation, and the spec-decode metrics count drafts per model."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request

import openai
import pytest

from clientutil import serving, stream_pieces
from models.decoder import greedy_reference
from models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPT = "Acme running shoes: save 20% today. Shop now. Acme running shoes:"


@pytest.fixture(scope="module")
def lm(tiny_bundle, tmp_path_factory):
  """The tiny bundle served with n-gram speculation (the model's config.json)."""
  repo = tmp_path_factory.mktemp("spec_repo")
  shutil.copytree(tiny_bundle, repo / "decoder" / "1")
  (repo / "decoder" / "config.json").write_text(json.dumps(
      {"speculative": "ngram", "num_speculative_tokens": 4}))
  with serving(repo, http_port=0) as bg:
    yield bg


@pytest.fixture(scope="module")
def want(tiny_model) -> str:
  (ids,) = greedy_reference(tiny_model, [TOK.encode(PROMPT)], max_new_tokens=30, eos_id=None)
  return TOK.decode(ids)


def client(bg) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"http://127.0.0.1:{bg.server.http_port}/v1", api_key="x",
                       max_retries=0, timeout=60)


def accepted(bg) -> float:
  text = bg.server.metrics.exposition().decode()
  m = re.search(r'^vllm:spec_decode_num_accepted_tokens_total\{model_name="decoder[^"]*"\} (\S+)',
                text, re.M)
  assert m, "no spec-decode metric for the model"
  return float(m.group(1))


def test_openai_streaming_equals_the_greedy_reference(lm, want):
  before = accepted(lm)
  chunks = list(client(lm).completions.create(
      model="decoder", prompt=PROMPT, max_tokens=30, temperature=0,
      extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True}))
  assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
  assert chunks[-1].usage.completion_tokens == 30
  assert accepted(lm) > before  # drafts were accepted, so steps emitted several tokens
  stop = want[len(want) // 2:len(want) // 2 + 2]  # cuts the completion before its first match
  res = client(lm).completions.create(model="decoder", prompt=PROMPT, max_tokens=30,
                                      temperature=0, stop=[stop], extra_body={"ignore_eos": True})
  assert res.choices[0].text == want[:want.index(stop)] and res.choices[0].finish_reason == "stop"


def test_tritonclient_grpc_streaming_equals_the_greedy_reference(lm, want):
  (pieces,) = stream_pieces(lm.address, "decoder", [PROMPT.encode()],
                            {"max_tokens": 30, "ignore_eos": True})
  assert b"".join(pieces).decode() == want


def test_http_generate_stream_equals_the_greedy_reference(lm, want):
  body = json.dumps({"text_input": PROMPT,
                     "parameters": {"max_tokens": 30, "ignore_eos": True}}).encode()
  req = urllib.request.Request(
      f"http://127.0.0.1:{lm.server.http_port}/v2/models/decoder/generate_stream", data=body,
      headers={"content-type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    events = [json.loads(line[5:]) for line in r.read().decode().splitlines()
              if line.startswith("data:")]
  assert len(events) > 1 and "".join(e["text_output"] for e in events) == want
