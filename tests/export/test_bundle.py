"""Bundle format: manifest round trip, loud failures for damaged or foreign bundles."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import export
from bundle import BundleError, read_manifest, restore_params


def _export_fn(repo, **kw):
  params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(3, 2), "b": jnp.array([1.0, -1.0])}
  return export.export_model(
      lambda p, ins: {"y": ins["x"] @ p["w"] + p["b"]}, params=params, repository=repo,
      name="lin", inputs=[export.Input("x", "float32", ("batch", 3))],
      config=export.ExportConfig(batch_buckets=(1, 2)), **kw), params


def test_manifest_round_trip_and_versions(tmp_path):
  path, params = _export_fn(tmp_path)
  assert path == tmp_path / "lin" / "1"
  m = read_manifest(path)
  assert m.name == "lin" and m.version == 1 and m.kind == "predict"
  assert m.jax_version == jax.__version__ and len(m.code_hash) == 16
  sig = m.signatures["serve"]
  assert [(t.name, t.shape, t.datatype) for t in sig.inputs] == [("x", (-1, 3), "FP32")]
  assert [(t.name, t.shape, t.dims) for t in sig.outputs] == [("y", (-1, 2), ("batch", None))]
  assert sorted(p.path for p in m.params) == ["b", "w"]
  leaves = restore_params(path, m)
  by_path = {p.path: np.asarray(x) for p, x in zip(m.params, leaves)}
  np.testing.assert_array_equal(by_path["w"], params["w"])
  path2, _ = _export_fn(tmp_path)  # next free version
  assert path2.name == "2"
  with pytest.raises(BundleError, match="already holds a bundle"):
    _export_fn(tmp_path, version=1)


def test_exported_function_runs_without_model_code(tmp_path):
  path, params = _export_fn(tmp_path)
  exp = jax.export.deserialize(bytearray((path / "serve.cpu.jaxexport").read_bytes()))
  m = read_manifest(path)
  x = np.array([[1.0, 2.0, 3.0]], np.float32)
  y = exp.call(restore_params(path, m), {"x": x})["y"]
  np.testing.assert_allclose(y, x @ np.asarray(params["w"]) + np.asarray(params["b"]))


@pytest.mark.parametrize("damage,needle", [
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").write_text(json.dumps({"format_version": 99})),
     "format_version 99 is not supported"),
    (lambda p: (p / "manifest.json").unlink(), "not an exported bundle"),
])
def test_damaged_manifest_fails_with_what_to_do(tmp_path, damage, needle):
  path, _ = _export_fn(tmp_path)
  damage(path)
  with pytest.raises(BundleError, match=needle):
    read_manifest(path)


def test_missing_params_fail_loudly(tmp_path):
  import shutil
  path, _ = _export_fn(tmp_path)
  m = read_manifest(path)
  shutil.rmtree(path / "params")
  with pytest.raises(BundleError, match="incomplete"):
    restore_params(path, m)


def test_bad_export_arguments():
  with pytest.raises(ValueError, match="first dimension must be 'batch'"):
    export.Input("x", "float32", (3, "batch"))
  with pytest.raises(ValueError, match="strictly increasing"):
    export.ExportConfig(batch_buckets=(4, 2))
