"""The real gRPC server with 2-D (batch x sequence) batching, against the exact MockSeqEngine."""

import contextlib

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from bundle import Manifest, Signature, write_bundle
from clientutil import call_concurrently
from clientutil import infer as triton_infer
from clientutil import serving, write_engine_bundle
from serving.engines.mock_seq import MockSeqEngine
from serving.runners import SeqRunner

BUCKETS, SEQ = (1, 2, 4, 8), (4, 8, 16)


@pytest.fixture
def seq_server(tmp_path):
  """start(**mock_kwargs) -> (BackgroundServer, MockSeqEngine) serving model "seq"."""
  with contextlib.ExitStack() as servers:

    def start(**engine_kwargs):
      eng = MockSeqEngine(buckets=BUCKETS, seq_buckets=SEQ, **engine_kwargs)
      write_engine_bundle(tmp_path / "repo", "seq", eng, seq_buckets=SEQ)
      return servers.enter_context(serving(tmp_path / "repo", lambda *a: eng)), eng

    yield start


def expected(tokens, segments, lengths):
  valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  total = np.where(valid, tokens + 1000 * segments, 0).sum(axis=1, keepdims=True)
  return total.astype(np.float32), 2 * tokens


def rand_request(rng, rows, length):
  tokens = rng.integers(-50, 50, size=(rows, length)).astype(np.int32)
  segments = rng.integers(0, 2, size=(rows, length)).astype(np.int32)
  lengths = rng.integers(0, length + 1, size=rows).astype(np.int32)
  return tokens, segments, lengths


def infer(client, tokens, segments, lengths):
  out = triton_infer(client, "seq", {"tokens": tokens, "segments": segments, "lengths": lengths},
                     ("total", "doubled"))
  return out["total"], out["doubled"]


def test_random_lengths_get_exact_answers_on_the_grid(seq_server):
  bg, eng = seq_server()
  rng = np.random.default_rng(0)
  cases = [rand_request(rng, int(r), int(l))
           for r, l in zip(rng.integers(1, 20, size=80), rng.integers(1, 17, size=80))]

  results = call_concurrently(bg.address, infer, cases)
  for case, (total, doubled) in zip(cases, results):
    want_total, want_doubled = expected(*case)
    np.testing.assert_array_equal(total, want_total)
    np.testing.assert_array_equal(doubled, want_doubled)  # cut back to the request's length
  assert set(eng.batches) <= {(b, s) for b in BUCKETS for s in SEQ}
  runner = bg.server.repository.get("seq").runner
  assert isinstance(runner, SeqRunner)
  real = sum(t.size for t, _, _ in cases)
  assert runner.seq_stats.real_tokens == real
  assert runner.seq_stats.padded_tokens == sum(b * s for b, s in eng.batches)


def test_a_lone_short_request_runs_at_its_own_bucket(seq_server):
  bg, eng = seq_server()
  with tc.InferenceServerClient(bg.address) as c:
    for length, want in ((3, 4), (5, 8), (16, 16), (9, 16)):
      eng.batches.clear()
      infer(c, *rand_request(np.random.default_rng(length), 1, length))
      assert eng.batches == [(1, want)]


def test_invalid_sequence_lengths_are_refused_with_a_clear_message(seq_server):
  bg, eng = seq_server()
  rng = np.random.default_rng(1)
  with tc.InferenceServerClient(bg.address) as c:
    tokens, segments, lengths = rand_request(rng, 2, 17)
    with pytest.raises(InferenceServerException, match="exceeds the model's maximum of 16") as e:
      infer(c, tokens, segments, lengths)
    assert "INVALID_ARGUMENT" in str(e.value.status())
    tokens, _, lengths = rand_request(rng, 2, 6)
    with pytest.raises(InferenceServerException, match="disagree on the sequence length") as e:
      infer(c, tokens, np.zeros((2, 5), np.int32), lengths)
    assert "INVALID_ARGUMENT" in str(e.value.status())
    assert "tokens has 6, segments has 5" in str(e.value)
  assert eng.batches == []


def test_metadata_shows_the_sequence_dimension(seq_server):
  bg, _ = seq_server()
  with tc.InferenceServerClient(bg.address) as c:
    md = c.get_model_metadata("seq")
    assert [(t.name, list(t.shape)) for t in md.inputs] == [
        ("tokens", [-1, -1]), ("segments", [-1, -1]), ("lengths", [-1])]
    cfg = c.get_model_config("seq").config
    assert [list(i.dims) for i in cfg.input] == [[-1], [-1], []]


def test_a_failing_batch_fails_only_the_poisoned_request(seq_server):
  bg, _ = seq_server(fail_token=999, delay_s=0.01)
  rng = np.random.default_rng(2)
  good = [rand_request(rng, 2, 7) for _ in range(6)]
  bad = rand_request(rng, 1, 6)
  bad[0][0, 0] = 999

  results = call_concurrently(bg.address, infer, good + [bad], workers=7, errors=True)
  assert isinstance(results[-1], InferenceServerException) and "injected" in str(results[-1])
  for case, res in zip(good, results):
    np.testing.assert_array_equal(res[0], expected(*case)[0])


def test_a_multi_signature_bundle_is_one_model_per_signature(tmp_path):
  """Repository naming: `<folder>_<suffix>` per signature; each loads, versions, unloads alone."""
  from serving.engines.mock import MockEngine
  from serving.kinds import runner_factories
  from serving.repository import ModelRepository, State

  seq, plain = MockSeqEngine(buckets=BUCKETS, seq_buckets=SEQ), MockEngine(buckets=BUCKETS)
  sigs = {"encode": Signature("encode", seq.inputs, seq.outputs, {}),
          "score": Signature("score", plain.inputs, plain.outputs, {})}

  def write(version):
    manifest = Manifest(name="multi", version=version, kind="predict", jax_version="0.10.2",
                        signatures=sigs, params=(), batch_buckets=BUCKETS, seq_buckets=SEQ,
                        serving={"signature_suffixes": {"encode": "enc"}})
    write_bundle(tmp_path / "multi" / str(version), manifest, [], {})

  made = []

  def factory(path, manifest, cfg):
    (sig,) = manifest.signatures  # each model sees only its own signature
    made.append((path.name, sig))
    return (MockSeqEngine(buckets=BUCKETS, seq_buckets=SEQ) if sig == "encode"
            else MockEngine(buckets=BUCKETS))

  write(1)
  repo = ModelRepository(tmp_path, kinds=runner_factories(factory))
  assert repo.discover() == ["multi_enc", "multi_score"]
  repo.load_all()
  assert sorted(made) == [("1", "encode"), ("1", "score")]
  assert [(r.name, r.version, r.state) for r in repo.records()] == [
      ("multi_enc", 1, State.READY), ("multi_score", 1, State.READY)]
  assert isinstance(repo.get("multi_enc").runner, SeqRunner)
  assert not isinstance(repo.get("multi_score").runner, SeqRunner)
  write(2)  # a new version reaches each signature's model
  repo.load("multi")  # the folder's name loads every model of the bundle
  assert [(r.name, r.version) for r in repo.records() if r.state is State.READY] == [
      ("multi_enc", 2), ("multi_score", 2)]
  repo.unload("multi_score")
  assert repo.get("multi_enc").version == 2
  repo.stop()


def test_sequence_lengths_are_recorded_for_bucket_plans(seq_server, capsys, tmp_path):
  """What `xlaserve plan-buckets --sizes seq` reads: every request's sequence length once."""
  from serving.cli import main as cli_main
  from serving.plan_buckets import METRIC, size_counts

  bg, _ = seq_server()
  sent = {3: 4, 6: 2, 11: 3}
  with tc.InferenceServerClient(bg.address) as client:
    for length, times in sent.items():
      for i in range(times):
        infer(client, *rand_request(np.random.default_rng(i), 2, length))
  text = bg.server.metrics.exposition().decode()
  assert size_counts(text, "seq", "1", METRIC["seq"]) == {n: float(c) for n, c in sent.items()}
  assert size_counts(text, "seq", "1") == {2: 9.0}  # rows per request
  scrape = tmp_path / "scrape.txt"
  scrape.write_text(text)
  assert cli_main(["plan-buckets", "--metrics", str(scrape), "--model", "seq", "--sizes", "seq",
                   "--current", ",".join(map(str, SEQ)), "--buckets", "3"]) == 0
  out = capsys.readouterr().out
  # 16 stays (the model's longest); of 3, 6, 11 the cheapest pair is 3 and 11: padded
  # tokens 4x3 + 2x11 + 3x11 = 67, against 72 for (3, 6) and 69 for (6, 11).
  assert "learned   3 buckets 3 11 16:" in out and "seq_buckets=(3, 11, 16,)" in out
