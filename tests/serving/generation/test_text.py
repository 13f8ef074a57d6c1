"""Prompt encoding, stop sequences across token boundaries, UTF-8 streaming, request validation."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import pytest

from bundle import BundleError
from models.tokenizer import ByteTokenizer
from serving.generation.request import GenerationRequest, SamplingParams
from serving.generation.text import ByteCodec, StopMatcher, utf8_stream
from serving.types import Code, ServingError


def feed_all(stops, pieces):
  m = StopMatcher(tuple(stops))
  out = b""
  for p in pieces:
    released, stopped = m.feed(p)
    out += released
    if stopped:
      return out, True
  return out + m.flush(), False


@pytest.mark.parametrize("stops, pieces, want", [
    ((b"END",), [b"ab", b"E", b"N", b"D", b"zz"], (b"ab", True)),
    ((b"END",), [b"ab", b"E", b"N", b"x"], (b"abENx", False)),
    ((b"\n\n",), [b"a", b"\n", b"b", b"\n", b"\n"], (b"a\nb", True)),
    ((b"aab",), [b"a", b"a", b"a", b"b"], (b"a", True)),  # overlapping prefix
    ((b"xyz", b"y"), [b"x", b"y"], (b"x", True)),  # the first to complete wins
    ((b"bcd", b"c"), [b"abcd"], (b"ab", True)),  # ... whatever the piece boundaries
    ((b"abc", b"bc"), [b"ab", b"c"], (b"", True)),  # ties: the one starting first
    ((b"stop",), [b"no stop here"[i:i + 1] for i in range(12)], (b"no ", True)),
])
def test_stop_matcher(stops, pieces, want):
  assert feed_all(stops, pieces) == want


def test_stop_matcher_holds_back_only_possible_prefixes():
  m = StopMatcher((b"END",))
  assert m.feed(b"xE") == (b"x", False)
  assert m.feed(b"Q") == (b"EQ", False)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.binary(max_size=40), st.lists(st.binary(min_size=1, max_size=3), min_size=1,
                                                   max_size=3), st.randoms())
def test_stop_matcher_equals_cutting_the_whole_text(text, stops, rnd):
  cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, 5)))
  pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
  # The first stop to complete, reading byte by byte (ties: the longer one).
  ends = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
  want = (text[:min(ends)[1]], True) if ends else (text, False)
  assert feed_all(stops, pieces) == want


def test_byte_codec_matches_the_model_tokenizer():
  tok = ByteTokenizer()
  codec = ByteCodec.from_spec(tok.spec())
  for prompt in ("Acme shoes:", "naïve €", b"\x00\xff raw"):
    assert codec.encode(prompt) == tok.encode(prompt)
  ids = tok.encode("héllo", eos=True)
  assert b"".join(codec.piece(i) for i in ids) == tok.decode_bytes(ids) == "héllo".encode()
  with pytest.raises(BundleError, match="not supported"):
    ByteCodec.from_spec({"kind": "sentencepiece"})


def test_tokenizer_spec_round_trip_and_validation():
  tok = ByteTokenizer()
  assert ByteTokenizer.from_spec(tok.spec()) == tok and tok.vocab_size == 259
  assert tok.decode(tok.encode("a€", bos=True, eos=True)) == "a€"
  with pytest.raises(ValueError):
    ByteTokenizer(bos_id=10)


def test_utf8_stream_emits_a_split_character_once_complete():
  dec = utf8_stream()
  euro = "€".encode()
  assert [dec.decode(euro[:1]), dec.decode(euro[1:2]), dec.decode(euro[2:] + b"!")] == [
      "", "", "€!"]
  assert utf8_stream().decode(b"\xe2\x82", final=True) == "\ufffd"


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0),
    dict(top_p=1.5), dict(seed=-1), dict(stop="x"), dict(stop=("",)), dict(stop=("a",) * 9),
    dict(temperature=float("nan")),
])
def test_sampling_params_validation(kw):
  with pytest.raises(ServingError) as e:
    SamplingParams(**kw)
  assert e.value.code is Code.INVALID_ARGUMENT


def test_request_validation():
  assert SamplingParams(stop=("a", b"b")).stop_bytes == (b"a", b"b")
  with pytest.raises(ServingError):
    GenerationRequest(prompt=[1, 2])  # type: ignore[arg-type]
