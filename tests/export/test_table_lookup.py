"""The from-embeddings artifact: exported beside the default signature of models with
categorical tables, with the lookup contract in the manifest (what table-wise serving needs)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export
from bundle import Manifest, TableLookup, read_manifest, restore_params
from models.dlrm import DLRM, DLRMConfig

INPUTS = [export.Input("dense", "float32", ("batch", 13)),
          export.Input("sparse", "int64", ("batch", 26))]


@pytest.fixture(scope="module")
def model():
  return DLRM(dataclasses.replace(DLRMConfig.tiny(), embedding_impl="xla"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("quant", ["none", "int8+int8_tables"])
def test_manifest_records_the_lookup_and_the_artifact_runs_the_rest(model, tmp_path, quant):
  path = export.export_model(model, repository=tmp_path, name="dlrm", inputs=INPUTS,
                             config=export.ExportConfig(batch_buckets=(1, 4), quantization=quant))
  m = read_manifest(path)
  lookup = m.signatures["serve"].table_lookup
  cfg = model.config
  assert (lookup.ids_input, lookup.embeddings_input) == ("sparse", "embeddings")
  assert lookup.rows == cfg.table_sizes and lookup.dim == cfg.embed_dim
  assert [m.params[i].path for i in lookup.tables] == (
      [f"tables/t{f:02d}" for f in range(26)] if quant == "none"
      else [f"tables/t{f:02d}/codes" for f in range(26)])
  if quant == "none":
    assert lookup.table_dtype == "float32" and lookup.scales == lookup.offsets == ()
  else:
    assert lookup.table_dtype == "int8"
    assert [m.params[i].path for i in lookup.scales][:1] == ["tables/t00/scale"]
    assert [m.params[i].path for i in lookup.offsets][:1] == ["tables/t00/offset"]
  assert dict(lookup.artifacts) == {"cpu": "serve.from_embeddings.cpu.jaxexport"}
  assert (path / lookup.artifacts["cpu"]).exists()
  # The manifest round-trips (and says how ids are read, for people).
  raw = json.loads((path / "manifest.json").read_text())
  assert raw["signatures"]["serve"]["table_lookup"]["ids"] == "modulo rows; negative -> zero vector"
  assert Manifest.from_json(m.to_json()) == m

  # The artifact, fed the lookup the contract describes, gives the signature's outputs.
  leaves = restore_params(path, m)
  rng = np.random.default_rng(0)
  dense = rng.normal(size=(4, 13)).astype(np.float32)
  sparse = rng.integers(-1, 5000, size=(4, 26)).astype(np.int32)
  emb = []
  for f, i in enumerate(lookup.tables):
    row = np.asarray(leaves[i], np.float32)
    if lookup.scales:
      row = (row * np.asarray(leaves[lookup.scales[f]])[:, None]
             + np.asarray(leaves[lookup.offsets[f]])[:, None])
    ids = sparse[:, f]
    emb.append(np.where((ids >= 0)[:, None], row[np.maximum(ids, 0) % lookup.rows[f]], 0.0))
  emb = np.stack(emb, axis=1).astype(np.float32)  # [B, F, D]
  dense_leaves = [x for i, x in enumerate(leaves) if i not in lookup.table_leaves]
  split = jax.export.deserialize(bytearray((path / lookup.artifacts["cpu"]).read_bytes()))
  got = split.call(dense_leaves, {"dense": dense, "embeddings": emb})["prob"]
  whole = jax.export.deserialize(
      bytearray((path / m.signatures["serve"].artifacts["cpu"]).read_bytes()))
  want = whole.call(leaves, {"dense": dense, "sparse": sparse})["prob"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_models_without_tables_or_with_own_signatures_have_no_lookup(model, tmp_path):
  fn = export.export_model(lambda p, ins: {"y": ins["x"] @ p["w"]}, params={"w": jnp.ones((3, 2))},
                           repository=tmp_path, name="lin",
                           inputs=[export.Input("x", "float32", ("batch", 3))])
  assert read_manifest(fn).signatures["serve"].table_lookup is None
  own = export.export_model(model, repository=tmp_path, name="own", inputs=INPUTS,
                            signatures={"serve": lambda m, **kw: m(**kw)},
                            config=export.ExportConfig(batch_buckets=(1,)))
  assert read_manifest(own).signatures["serve"].table_lookup is None


def test_table_lookup_validates():
  with pytest.raises(ValueError, match="row counts"):
    TableLookup("sparse", "embeddings", (1, 2), (4,), 8, "float32", {})
  with pytest.raises(ValueError, match="one leaf per table"):
    TableLookup("sparse", "embeddings", (1, 2), (4, 4), 8, "int8", {}, scales=(3,), offsets=(4,))
