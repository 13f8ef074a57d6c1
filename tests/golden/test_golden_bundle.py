"""Format regression guard: today's code loads and serves the checked-in golden bundle unchanged.

The bundle and expected.npz were written once by tests/golden/make_golden.py. If this test
fails, the code changed how bundles are read or served: fix the code, or (for a deliberate
format change) bump bundle.FORMAT_VERSION, keep reading format 1, and regenerate.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
import tritonclient.grpc as tc

from bundle import FORMAT_VERSION, compute_code_hash, read_manifest, served_models
from clientutil import assert_served_like, infer, serving

HERE = pathlib.Path(__file__).resolve().parent
BUNDLE = HERE / "repo" / "golden" / "1"
MODELS = {"golden_tokens": "per_token", "golden_pooled": "pooled", "golden_affine": "affine"}


def expected() -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """signature -> {"in": {...}, "out": {...}} from expected.npz."""
  out: dict = {}
  with np.load(HERE / "expected.npz") as z:
    for key in z.files:
      sig, kind, name = key.split("/")
      out.setdefault(sig, {"in": {}, "out": {}})[kind][name] = z[key]
  return out


def test_manifest_reads_as_format_1():
  raw = json.loads((BUNDLE / "manifest.json").read_text())
  assert raw["format_version"] == 1 == FORMAT_VERSION
  m = read_manifest(BUNDLE)
  assert (m.name, m.version, m.kind, m.jax_version) == ("golden", 1, "predict", "0.10.2")
  assert m.batch_buckets == (1, 4) and m.seq_buckets == (4, 8)
  assert served_models("golden", m) == MODELS
  assert dict(m.signatures["pooled"].artifacts) == {"cpu@s4": "pooled.cpu.s4.jaxexport",
                                                    "cpu@s8": "pooled.cpu.s8.jaxexport"}
  assert dict(m.signatures["affine"].artifacts) == {"cpu": "affine.cpu.jaxexport"}
  assert [(p.path, p.shape, p.logical_axes) for p in m.params] == [
      ("b", (3,), ("mlp",)), ("embed", (16, 4), ("vocab", "embed")),
      ("w", (4, 3), ("embed", "mlp"))]
  # The checked-in StableHLO and param specs still hash to the code hash written at export.
  artifacts = {f: (BUNDLE / f).read_bytes() for s in m.signatures.values()
               for f in s.artifacts.values()}
  assert compute_code_hash(artifacts, m.params, m.batch_buckets, m.seq_buckets) == m.code_hash


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  repo = tmp_path_factory.mktemp("repo")
  shutil.copytree(HERE / "repo", repo, dirs_exist_ok=True)  # never write into the checkout
  with serving(repo) as bg:
    yield bg


@pytest.mark.parametrize("model", sorted(MODELS))
def test_served_outputs_equal_the_saved_ones(served, model):
  case = expected()[MODELS[model]]
  floats = {k: v for k, v in case["out"].items() if v.dtype.kind == "f"}
  exact = {k: v for k, v in case["out"].items() if v.dtype.kind != "f"}
  with tc.InferenceServerClient(served.address) as c:
    assert c.is_model_ready(model)
    # A few float ops: equal up to the CPU's rounding; everything else exactly.
    assert assert_served_like(c, model, [case["in"]], lambda **_: floats,
                              rtol=1e-6, atol=1e-7) == 1
    assert assert_served_like(c, model, [case["in"]], lambda **_: exact) == 1
    got = infer(c, model, case["in"])
  assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in case["out"].items()}
