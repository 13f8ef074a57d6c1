"""The demo LM's shipped weights (demo/weights.py, demo/weights/lm.npz): small, for the demo's
current recipe, reproducing the outputs recorded when they were made, and a first start falls
back to training (with progress lines) when they are missing or stale.

Opt-in (trains the demo LM again, about 2 minutes on 2 cores, and compares with the file):

    XLASERVE_WEIGHTS_TEST=1 python -m pytest tests/demo/test_weights.py -v -k regenerate
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from demo.weights import (LM_WEIGHTS, WeightsUnavailable, dequantize_rows, lm_recipe, load_lm,
                          pack, quantize_rows, read_lm, recipe_key, save_lm, trained_lm,
                          unpack_into)
from export.generative import GenerativeExportConfig
from models.decoder import Decoder, DecoderConfig, greedy_reference
from models.tokenizer import ByteTokenizer
from procutil import REPO_ROOT, child_env

MAX_BYTES = 4 << 20


def _params(model) -> list:
  """[(path, array)] of the model's nnx.Params, in a fixed order."""
  return jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))


def test_quantize_rows_worked_by_hand():
  q, scale = quantize_rows(np.array([[2.54, -1.0, 0.0], [0.0, 0.0, 0.0]], np.float32))
  np.testing.assert_allclose(scale, [0.02, 1.0], rtol=1e-6)  # 2.54 / 127; an all-zero row: 1
  np.testing.assert_array_equal(q, [[127, -50, 0], [0, 0, 0]])
  np.testing.assert_allclose(dequantize_rows(q, scale), [[2.54, -1.0, 0.0], [0, 0, 0]],
                             rtol=1e-6)


def test_pack_then_unpack_is_within_half_a_step():
  model = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(3))
  arrays = pack(model)
  other = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(4))
  unpack_into(other, arrays)
  checked = 0
  for (path, w), (_, g) in zip(_params(model), _params(other), strict=True):
    w, g = np.asarray(w), np.asarray(g)
    if w.ndim < 2:
      np.testing.assert_array_equal(g, w, err_msg=str(path))
    else:
      half_step = np.abs(w).max(axis=-1, keepdims=True) / 127 / 2
      assert (np.abs(g - w) <= half_step * (1 + 1e-5)).all(), path
      assert not np.array_equal(g, w)  # it was quantized, not copied
    checked += 1
  assert checked > 10


def test_shipped_weights_are_small_and_for_the_demo_recipe():
  assert LM_WEIGHTS.stat().st_size < MAX_BYTES, LM_WEIGHTS.stat().st_size
  meta, _ = read_lm(LM_WEIGHTS)
  want = recipe_key(lm_recipe(DecoderConfig.demo(), GenerativeExportConfig.demo()))
  assert meta["recipe_key"] == want, (
      "the demo LM's recipe changed: regenerate with python tools/make_demo_weights.py")
  assert meta["quality"]["greedy_prompts_identical"] == meta["quality"]["greedy_prompts"]


@pytest.mark.slow  # test_the_demo_lm_bundle_serves_the_recorded_greedy_text covers it end to end
def test_shipped_weights_reproduce_their_recorded_outputs():
  model, meta = load_lm(LM_WEIGHTS, DecoderConfig.demo(), GenerativeExportConfig.demo())
  _, arrays = read_lm(LM_WEIGHTS)
  tok = ByteTokenizer()
  prompts = meta["reference_prompts"]
  ids = [tok.encode(p) for p in prompts]
  logits = np.stack([np.asarray(model(jnp.asarray([seq], jnp.int32))[0, -1]) for seq in ids])
  np.testing.assert_allclose(logits, arrays["reference.logits"], rtol=1e-4, atol=1e-3)
  recorded = [arrays[f"reference.tokens.{i}"].tolist() for i in range(len(prompts))]
  got = greedy_reference(model, ids, max_new_tokens=len(recorded[0]), eos_id=tok.eos_id)
  assert got == recorded
  for text in map(tok.decode, got):  # the corpus's shape: "<product>: <offer>. <Closer>"
    assert re.match(r" [a-z ]+: [^.]+\. [A-Z]", text), text


def test_the_demo_lm_bundle_serves_the_recorded_greedy_text(tmp_path):
  """End to end: build_lm exports the shipped weights, and the server's paged-KV generation of a
  recorded prompt equals the continuation recorded when the weights were made."""
  import tritonclient.grpc as tc

  from clientutil import serving, triton_inputs
  from demo.repository import build_lm

  lines = []
  build_lm(tmp_path, progress=lines.append)
  assert any("using the shipped trained weights" in x for x in lines), lines
  meta, arrays = read_lm(LM_WEIGHTS)
  want = ByteTokenizer().decode(arrays["reference.tokens.0"].tolist()).encode()
  with serving(tmp_path) as bg, tc.InferenceServerClient(bg.address) as c:
    text = triton_inputs({"text_input": np.array([meta["reference_prompts"][0].encode()],
                                                 dtype=object)})
    res = c.infer("lm", text, parameters={"max_tokens": len(arrays["reference.tokens.0"])})
  assert res.as_numpy("text_output")[0] == want


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_missing_or_stale_weights_fall_back_to_training_with_progress(tmp_path):
  config = dataclasses.replace(GenerativeExportConfig.tiny(), train_steps=3)
  lines = []
  model, info = trained_lm(DecoderConfig.tiny(), config, lines.append,
                           weights=tmp_path / "missing.npz")
  text = "\n".join(lines)
  assert "no shipped LM weights" in text and "lm: train step 3/3" in text, text
  assert info["weights"] == "trained at build time" and info["training"]["steps"] == 3
  path = tmp_path / "lm.npz"
  save_lm(path, model, config, info["training"])
  lines.clear()
  loaded, info = trained_lm(DecoderConfig.tiny(), config, lines.append, weights=path)
  assert "using the shipped trained weights" in lines[0] and not any("train step" in x
                                                                     for x in lines), lines
  assert info["weights"] == "shipped lm.npz"
  want = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(0))
  unpack_into(want, pack(model))
  for (where, w), (_, g) in zip(_params(want), _params(loaded), strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(where))
  stale = dataclasses.replace(config, train_steps=4)  # another recipe: the file does not fit
  with pytest.raises(WeightsUnavailable, match="recipe"):
    load_lm(path, DecoderConfig.tiny(), stale)


@pytest.mark.skipif(os.environ.get("XLASERVE_WEIGHTS_TEST") != "1",
                    reason="trains the demo LM (minutes): set XLASERVE_WEIGHTS_TEST=1")
def test_regenerate_reproduces_the_shipped_weights():
  p = subprocess.run([sys.executable, "tools/make_demo_weights.py", "--check"], cwd=REPO_ROOT,
                     env=child_env(), capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0 and "matches the shipped weights" in p.stdout, p.stdout + p.stderr
