"""export_model for any Flax model (NNX, Linen + variables, apply function): batch and sequence
dimensions, several signatures, the quantization choice, and the jax version guard on load."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import export
from bundle import BundleError, read_manifest, served_models
from serving.engines import BundleEngine
from serving.kinds import runner_factories
from serving.repository import ModelRepository, State
from serving.engines import SeqBundleEngine

BATCH, SEQ = (1, 2), (4, 8)
TOKENS = [export.Input("tokens", "int32", ("batch", "seq")),
          export.Input("lengths", "int32", ("batch",))]


def run(engine, inputs):
  """Pads `inputs` to the engine's smallest fitting batch bucket, runs it, cuts the rows back."""
  rows = len(next(iter(inputs.values())))
  b = min(x for x in engine.buckets if x >= rows)
  padded = {k: np.concatenate([v, np.zeros((b - rows, *v.shape[1:]), v.dtype)])
            for k, v in inputs.items()}
  return {k: v[:rows] for k, v in engine.fetch(engine.dispatch(bucket=b, inputs=padded)).items()}


def token_batch(rows, length, seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": rng.integers(0, 50, (rows, length)).astype(np.int32),
          "lengths": rng.integers(1, length + 1, rows).astype(np.int32)}


def masked_mean(h, lengths):  # h [B, S, D], lengths [B] -> [B, D]
  mask = (jnp.arange(h.shape[1])[None, :] < lengths[:, None])[..., None]
  return jnp.sum(jnp.where(mask, h, 0.0), axis=1) / jnp.maximum(lengths[:, None], 1)


class NNXEncoder(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(50, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)  # RNG state must not break the export

  def per_token(self, tokens, lengths):
    return {"h": self.drop(self.embed(tokens))}

  def pooled(self, tokens, lengths):
    return {"v": masked_mean(self.per_token(tokens, lengths)["h"], lengths)}


def test_nnx_module_with_sequence_inputs_and_two_signatures(tmp_path):
  model = NNXEncoder(nnx.Rngs(0))
  model.eval()
  path = export.export_model(
      model, repository=tmp_path, name="enc", inputs={"pooled": TOKENS, "per_token": TOKENS},
      signatures={"pooled": lambda m, **kw: m.pooled(**kw),
                  "per_token": lambda m, **kw: m.per_token(**kw)},
      config=export.ExportConfig(batch_buckets=BATCH, seq_buckets=SEQ,
                                 signature_suffixes={"per_token": "tokens"}))
  m = read_manifest(path)
  assert m.jax_version == jax.__version__ and m.quantization == "none"
  assert m.seq_buckets == SEQ and m.batch_buckets == BATCH
  assert dict(m.signatures["pooled"].artifacts) == {
      "cpu@s4": "pooled.cpu.s4.jaxexport", "cpu@s8": "pooled.cpu.s8.jaxexport"}
  h = m.signatures["per_token"].outputs[0]
  assert (h.shape, h.dims) == ((-1, -1, 8), ("batch", "seq", None))
  assert served_models("enc", m) == {"enc_pooled": "pooled", "enc_tokens": "per_token"}
  for sig, method in (("pooled", model.pooled), ("per_token", model.per_token)):
    eng = SeqBundleEngine(path, signature=sig)
    eng.warmup()
    assert eng.grid == ((1, 4), (2, 4), (1, 8), (2, 8))
    for rows, length in ((1, 3), (2, 8), (2, 5)):
      x = token_batch(rows, length, seed=length)
      got = run(eng, x)
      want = method(**{k: jnp.asarray(v) for k, v in x.items()})
      for k, w in want.items():
        g = got[k][:, :length] if k == "h" else got[k]  # the engine returns the padded bucket
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


class LinenEncoder(nn.Module):
  @nn.compact
  def __call__(self, tokens, lengths):
    h = nn.Dense(4)(nn.Embed(50, 6)(tokens))
    return {"v": masked_mean(h, lengths)}


def test_linen_module_with_variables(tmp_path):
  module = LinenEncoder()
  x = token_batch(2, 8)
  variables = module.init(jax.random.key(0), jnp.asarray(x["tokens"]), jnp.asarray(x["lengths"]))
  axes = jax.tree.map(lambda a: ("embed",) * a.ndim, variables)
  path = export.export_model(module, repository=tmp_path, name="lin", inputs=TOKENS,
                             params=variables, logical_axes=axes,
                             config=export.ExportConfig(batch_buckets=BATCH, seq_buckets=SEQ))
  m = read_manifest(path)
  assert all(p.logical_axes == ("embed",) * len(p.shape) for p in m.params)
  eng = SeqBundleEngine(path)
  eng.warmup()
  for rows, length in ((1, 2), (2, 7)):
    x = token_batch(rows, length, seed=rows)
    want = module.apply(variables, jnp.asarray(x["tokens"]), jnp.asarray(x["lengths"]))["v"]
    np.testing.assert_allclose(run(eng, x)["v"], want, rtol=1e-6, atol=1e-6)


def test_apply_function_with_several_signatures(tmp_path):
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}

  def apply(p, inputs):
    return {"y": inputs["x"] @ p["w"] + p["b"]}

  path = export.export_model(
      apply, repository=tmp_path, name="fn", params=params,
      inputs=[export.Input("x", "float32", ("batch", 3))],
      signatures={"affine": lambda p, **kw: apply(p, kw),
                  "relu": lambda p, **kw: {"y": jax.nn.relu(apply(p, kw)["y"] - 2.0)}},
      config=export.ExportConfig(batch_buckets=BATCH))
  x = np.array([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]], np.float32)
  for sig, want in (("affine", x @ params["w"] + params["b"]),
                    ("relu", np.maximum(x @ params["w"] + params["b"] - 2.0, 0.0))):
    eng = BundleEngine(path, signature=sig)
    eng.warmup()
    np.testing.assert_allclose(run(eng, {"x": x})["y"], want, rtol=1e-6)


def test_single_signature_function_exports_with_its_default_name(tmp_path):
  path = export.export_model(lambda p, ins: {"y": ins["x"] * p["s"]}, repository=tmp_path,
                             name="scale", params={"s": jnp.float32(3.0)},
                             inputs=[export.Input("x", "float32", ("batch", 2))],
                             config=export.ExportConfig(batch_buckets=(1,)))
  m = read_manifest(path)
  assert list(m.signatures) == ["serve"] and served_models("scale", m) == {"scale": "serve"}


def test_bad_sequence_outputs_and_names_are_refused(tmp_path):
  ins = [export.Input("x", "float32", ("batch", "seq"))]
  with pytest.raises(ValueError, match="fixed, the batch or the sequence"):
    export.export_model(lambda p, i: {"y": jnp.concatenate([i["x"], i["x"]], axis=1)},
                        repository=tmp_path, name="bad", params={}, inputs=ins,
                        config=export.ExportConfig(seq_buckets=SEQ))
  with pytest.raises(ValueError, match="give ExportConfig.seq_buckets"):
    export.export_model(lambda p, i: {"y": i["x"]}, repository=tmp_path, name="bad", params={},
                        inputs=ins)
  with pytest.raises(ValueError, match="names \\['nope'\\], not signatures"):
    export.export_model(lambda p, i: {"y": i["x"]}, repository=tmp_path, name="bad", params={},
                        inputs=ins, config=export.ExportConfig(
                            seq_buckets=SEQ, signature_suffixes={"nope": "x"}))
  with pytest.raises(ValueError, match="positive and strictly increasing"):
    export.ExportConfig(seq_buckets=(0, 4))
  with pytest.raises(ValueError, match="use letters"):
    export.ExportConfig(signature_suffixes={"a": "b/c"})


def test_quantization_choice(tmp_path):
  from export.quantize import QUANTIZATIONS
  assert "none" in QUANTIZATIONS
  fn_args = dict(params={"w": jnp.ones((2, 2))},
                 inputs=[export.Input("x", "float32", ("batch", 2))])
  with pytest.raises(ValueError, match="quantization='bogus' must be one of"):
    export.export_model(NNXEncoder(nnx.Rngs(0)), repository=tmp_path, name="q", inputs=TOKENS,
                        config=export.ExportConfig(seq_buckets=SEQ, quantization="bogus"))
  with pytest.raises(ValueError, match="NNX modules"):
    export.export_model(lambda p, i: {"y": i["x"] @ p["w"]}, repository=tmp_path, name="q",
                        config=export.ExportConfig(quantization="int8"), **fn_args)


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_int8_dense_layers_serve_close_to_float(tmp_path):
  """The choice reaches the bundle: models.layers.Dense kernels become int8 (weight-only)."""
  from models.relevance import RelevanceConfig, RelevanceModel
  from demo.models import relevance_inputs

  def model():
    return RelevanceModel(RelevanceConfig.tiny(), rngs=nnx.Rngs(0))

  path = export.export_model(model(), repository=tmp_path, name="rel", inputs=relevance_inputs(),
                             config=export.ExportConfig(batch_buckets=(2,), seq_buckets=(16,),
                                                        quantization="int8"))
  m = read_manifest(path)
  assert m.quantization == "int8" and any(p.dtype == "int8" for p in m.params)
  eng = SeqBundleEngine(path)
  eng.warmup()
  rng = np.random.default_rng(0)
  x = {"token_ids": rng.integers(0, 512, (2, 16)).astype(np.int32),
       "segment_ids": (np.arange(16) >= 6).astype(np.int32)[None].repeat(2, 0),
       "lengths": np.array([16, 9], np.int32)}
  want = nnx.jit(lambda m, kw: m(**kw))(model(), x)["score"]
  np.testing.assert_allclose(run(eng, x)["score"], want, atol=2e-2)


def _set_jax_version(path, version):
  manifest = json.loads((path / "manifest.json").read_text())
  manifest["jax_version"] = version
  (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("version,needle", [
    ("99.0.0", "newer than this server's jax"),
    ("0.1.0", "too old for jax"),
    ("unknown", "is unreadable"),
])
def test_bundles_from_an_incompatible_jax_fail_to_load_with_a_clear_message(tmp_path, version,
                                                                             needle):
  seq = export.export_model(NNXEncoder(nnx.Rngs(0)), repository=tmp_path, name="seq",
                            inputs=TOKENS, signatures={"pooled": lambda m, **kw: m.pooled(**kw)},
                            config=export.ExportConfig(batch_buckets=(1,), seq_buckets=(4,)))
  plain = export.export_model(lambda p, i: {"y": i["x"] * p["s"]}, repository=tmp_path,
                              name="plain", params={"s": jnp.float32(2.0)},
                              inputs=[export.Input("x", "float32", ("batch", 2))],
                              config=export.ExportConfig(batch_buckets=(1,)))
  for path in (seq, plain):
    _set_jax_version(path, version)
  with pytest.raises(BundleError, match=needle):
    SeqBundleEngine(seq)
  with pytest.raises(BundleError, match=needle):
    BundleEngine(plain)
  repo = ModelRepository(tmp_path, kinds=runner_factories())
  repo.load_all()
  for rec in repo.records():
    assert rec.state is State.UNAVAILABLE and needle in rec.reason, rec
  repo.stop()
