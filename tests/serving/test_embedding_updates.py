"""Live embedding updates under load: while gRPC and HTTP clients send requests, 100 updates
(cached tables, a table on the device, a dense leaf) are applied through the HTTP update route,
the last ones by `xlaserve update` from a directory of deltas. Every answer names the params
generation that scored it (both ends, for a request split across an update) and equals the
all-on-device model at that generation; nothing fails; a bad update is refused whole."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th

from clientutil import serving, triton_inputs
from serving import update_cli
from serving.engines.cached import CachedTablesEngine, EmbeddingCacheConfig
from servingutil import export_dlrm, http_inputs, run_padded

TABLES = (5000, 3000) + (64,) * 24
BUCKETS = (1, 8, 64)
DIM = 8  # DLRMConfig.tiny's embed_dim
UPDATES, BY_CLI = 100, 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  export_dlrm(repo, seed=5, buckets=BUCKETS, table_sizes=TABLES, name="ads", config={
      "embedding_cache": {"device_budget": "96KiB", "min_device_table_bytes": 4096}})
  with serving(repo, http_port=0) as bg:
    yield bg, repo / "ads" / "1"


def hot_ids(rng, b: int) -> np.ndarray:
  """Ids concentrated on a few rows of every table (the rows the updates change)."""
  ids = rng.integers(0, 40, size=(b, len(TABLES))) + rng.integers(0, 2, (b, 1)) * 5000
  ids[rng.random(ids.shape) < 0.05] = -1
  return ids.astype(np.int64)


def make_update(rng, manifest, k: int) -> dict[str, np.ndarray]:
  """Update k: new values for hot rows of both cached tables and a device table; every tenth
  also a row of a dense leaf."""
  u = {}
  for leaf, rows in (("tables/t00", 5000), ("tables/t01", 3000), ("tables/t05", 64)):
    ids = rng.choice(40, 6, replace=False) + rng.integers(0, 3, 6) * rows  # hashed ids
    u[leaf], u["rows:" + leaf] = rng.normal(0, 2, (6, DIM)).astype(np.float32), ids
  if k % 10 == 0:
    w = next(p for p in manifest.params if p.path.startswith("bottom") and len(p.shape) == 2)
    u[w.path] = rng.normal(size=(1, *w.shape[1:])).astype(np.float32)
    u["rows:" + w.path] = np.array([k % w.shape[0]])
  return u


def npz(arrays: dict[str, np.ndarray]) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def changes(u: dict[str, np.ndarray]) -> dict:
  return {k: (u["rows:" + k], v) for k, v in u.items() if not k.startswith("rows:")}


def test_updates_under_load_every_answer_matches_its_generation(served, tmp_path):
  bg, path = served
  url = f"http://127.0.0.1:{bg.server.http_port}"
  ref = CachedTablesEngine(path, config=EmbeddingCacheConfig())
  ref.warmup()
  rng = np.random.default_rng(0)
  updates = [make_update(rng, ref.manifest, k) for k in range(1, UPDATES + 1)]
  answers, errors, stop = [], [], threading.Event()

  def client(k: int) -> None:
    r = np.random.default_rng(100 + k)
    grpc_c = http_c = None
    try:
      grpc_c = tc.InferenceServerClient(bg.address) if k % 2 == 0 else None
      http_c = th.InferenceServerClient(url[len("http://"):]) if k % 2 == 1 else None
      while not stop.is_set():
        b = int(r.integers(1, 65))
        ins = {"dense": r.normal(size=(b, 13)).astype(np.float32), "sparse": hot_ids(r, b)}
        if grpc_c:
          res = grpc_c.infer("ads", triton_inputs(ins))
          params = {k: v.int64_param for k, v in res.get_response().parameters.items()}
        else:
          res = http_c.infer("ads", http_inputs(ins))
          params = res.get_response().get("parameters") or {}
        hi = params.get("params_generation", 0)
        answers.append((params.get("params_generation_min", hi), hi, ins, res.as_numpy("prob")))
    except Exception as e:  # any failure is the test's failure
      errors.append(e)
    finally:
      for c in (grpc_c, http_c):
        if c is not None:
          c.close()

  threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
  for t in threads:
    t.start()
  while len(answers) < 40 and not errors:  # some answers from the bundle's own params first
    stop.wait(0.05)
  try:
    for k, u in enumerate(updates[:UPDATES - BY_CLI], 1):
      assert update_cli.send(url, "ads", None, npz(u), None, 60)["generation"] == k
    deltas = tmp_path / "deltas"
    deltas.mkdir()
    for k, u in enumerate(updates[UPDATES - BY_CLI:]):
      (deltas / f"{k:03d}.npz").write_bytes(npz(u))
    out = subprocess.run([sys.executable, "-m", "serving.cli", "update", "--url", url,
                          "--model", "ads", str(deltas)], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert f"generation {UPDATES}" in out.stdout.splitlines()[-1]
  finally:
    stop.set()
    for t in threads:
      t.join(60)
  assert not errors, errors[:3]
  gens = sorted({hi for _, hi, _, _ in answers})
  assert gens[0] == 0 and gens[-1] == UPDATES and len(gens) > UPDATES // 2, gens
  # A request split across two batches may straddle an update: it then names both ends, and
  # each of its rows must equal the reference at one of them. The server may run a row at
  # another bucket than the reference does (a few ulps apart); an update moves the rows it
  # touches by far more than the tolerance.
  wanted: dict[int, dict[int, np.ndarray]] = {}
  for g in range(UPDATES + 1):
    if g:
      ref.apply_update(changes(updates[g - 1]))
    for i, (lo, hi, ins, _) in enumerate(answers):
      if g in (lo, hi):
        wanted.setdefault(i, {})[g] = run_padded(ref, ins, "prob")
  straddled = 0
  for i, (lo, hi, _, got) in enumerate(answers):
    close = [np.isclose(got, wanted[i][g], rtol=1e-5, atol=1e-6).all(axis=1) for g in {lo, hi}]
    bad = ~np.logical_or.reduce(close)
    assert not bad.any(), (f"answer {i}, generations {lo}..{hi}, rows {np.flatnonzero(bad)} of"
                           f" {len(got)} differ by {[np.abs(got - wanted[i][g])[bad].max() for g in {lo, hi}]}")
    straddled += lo != hi
  assert straddled < len(answers) // 4
  ref.close()


def test_a_bad_update_is_refused_whole(served):
  bg, path = served
  url = f"http://127.0.0.1:{bg.server.http_port}"
  rows = np.array([1, 2])
  good = np.ones((2, DIM), np.float32)
  cases = [({"tables/t00": good, "rows:tables/t00": rows, "tables/nope": good}, "no param"),
           ({"tables/t00": good, "rows:tables/t00": rows, "tables/t01": np.ones((2, 3)),
             "rows:tables/t01": rows}, "shape"),
           ({"tables/t00": good}, "no rows"),
           ({"tables/t00": good, "rows:tables/t00": np.array([-5, 1])}, "non-negative")]
  before = bg.server.repository.get("ads").runner.engine.generation
  for arrays, match in cases:
    with pytest.raises(RuntimeError, match=f"HTTP 400.*{match}"):
      update_cli.send(url, "ads", None, npz(arrays), None, 60)
  with pytest.raises(RuntimeError, match="HTTP 400.*npz"):
    update_cli.send(url, "ads", None, b"not a zip file", None, 60)
  assert bg.server.repository.get("ads").runner.engine.generation == before


def test_an_update_over_grpc_repository_model_load(served):
  """Triton's RepositoryModelLoad with a `params_update` file (tritonclient's load_model(files=))
  updates the served version in place; anything else beside it is refused."""
  import grpc
  from tritonclient.utils import InferenceServerException

  from serving.frontend.protocol import grpc_service_pb2 as pb
  from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc

  bg, path = served
  engine = bg.server.repository.get("ads").runner.engine
  before = engine.generation
  ids = np.array([7, 5007])  # the same row of t00, twice (hashed)
  u = {"tables/t00": np.full((2, DIM), 3.0, np.float32), "rows:tables/t00": ids}
  with tc.InferenceServerClient(bg.address) as c:
    c.load_model("ads", files={"params_update": npz(u)})
    assert engine.generation == before + 1
    with pytest.raises(InferenceServerException, match="do not go with"):
      c.load_model("ads", config="{}", files={"params_update": npz(u)})
    ins = {"dense": np.zeros((1, 13), np.float32), "sparse": np.full((1, len(TABLES)), 7)}
    res = c.infer("ads", triton_inputs(ins))
    assert res.get_response().parameters["params_generation"].int64_param == before + 1
  with grpc.insecure_channel(bg.address) as ch:  # the generation, as trailing metadata
    stub = pb_grpc.GRPCInferenceServiceStub(ch)
    req = pb.RepositoryModelLoadRequest(model_name="ads")
    req.parameters["params_update"].bytes_param = npz(u)
    _, call = stub.RepositoryModelLoad.with_call(req)
    assert dict(call.trailing_metadata())["params-generation"] == str(before + 2)
