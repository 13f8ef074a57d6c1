"""AWQ int4 weights for the decoder: quality against float32 and RTN, and the served bundle.

The tiny decoder (trained for a few seconds, session fixture) is quantized as the export does
(128 calibration lines, seed 1) with group size 64 (its d_model is 64). Bounds, measured on this
model: AWQ's held-out perplexity within 1% of float32 (measured +0.64%; RTN int4 +1.44%) and not
above RTN's; the served AWQ bundle's greedy completions equal the AWQ model's own greedy
reference exactly, and agree with float32's on at least 35% of positions (free running over 5
prompts x 16 tokens, so one early flip costs the rest of a prompt; measured 0.59, RTN 0.64:
on this little text the measure is dominated by near-ties, see benchmarks/lm_quant.py for the
demo LM's top-1 agreement).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import tritonclient.grpc as tc

from clientutil import serving, triton_inputs
from export.awq import LayerReport, calibration_tokens, quantize_generate_weights
from export.generative import GenerativeExportConfig, ad_corpus, export_generative
from export.lm_eval import HELD_OUT_SEED, greedy_agreement, perplexity
from models.decoder import greedy_reference
from models.int4_dense import Int4Dense
from models.tokenizer import ByteTokenizer
from pallas_kernels.lowering import TRITON_CUSTOM_CALL

GROUP = 64
PPL_BOUND = 0.01  # AWQ perplexity <= float32 * (1 + PPL_BOUND)
AGREEMENT_FLOOR = 0.35
PROMPTS = ["Acme shoes:", "Northwind rain", "Lumen desk lamps: save", "Orbit", "Summit yoga mats"]


@pytest.fixture(scope="module")
def quantized(tiny_model):
  """(AWQ model, its per-layer report, RTN model), calibrated as the export does (seed 1)."""
  awq, extra = quantize_generate_weights(tiny_model, "awq", group_size=GROUP, seed=1)
  rtn, _ = quantize_generate_weights(tiny_model, "int4", group_size=GROUP, seed=1)
  return awq, [LayerReport(**r) for r in extra["int4"]["layers"]], rtn


def test_awq_perplexity_near_float_and_not_worse_than_rtn(tiny_model, quantized):
  awq, _, rtn = quantized
  held = calibration_tokens(ad_corpus(96, seed=HELD_OUT_SEED), 128)
  ppl = {name: perplexity(m, held) for name, m in
         (("float32", tiny_model), ("awq", awq), ("rtn", rtn))}
  assert ppl["awq"] <= ppl["float32"] * (1 + PPL_BOUND), ppl
  assert ppl["awq"] <= ppl["rtn"], ppl
  assert ppl["rtn"] > ppl["float32"], ppl  # int4 is lossy: the bound above is not vacuous


def test_search_lowers_each_layers_calibration_error(quantized):
  _, reports, _ = quantized
  assert [r.name for r in reports] == ["blocks/0/mlp/gate+up", "blocks/0/mlp/down",
                                       "blocks/1/mlp/gate+up", "blocks/1/mlp/down", "head"]
  for r in reports:
    assert r.error <= r.rtn_error and 0 <= r.alpha < 1
  assert any(r.alpha > 0 and r.error < r.rtn_error for r in reports)


def test_layers_become_int4_and_scales_fold_into_the_op_before(tiny_model, quantized):
  awq, reports, _ = quantized
  assert isinstance(awq.blocks[0].mlp.down, Int4Dense) and isinstance(awq.head, Int4Dense)
  assert awq.blocks[0].mlp.down.kernel_packed[...].dtype == np.uint8
  assert tiny_model.blocks[0].mlp.down.quantization == "none"  # the input model is a copy
  assert reports[0].alpha > 0  # block 0's gate/up inputs were rescaled ...
  f_norm = np.asarray(tiny_model.blocks[0].mlp_norm.scale[...])
  q_norm = np.asarray(awq.blocks[0].mlp_norm.scale[...])
  assert not np.allclose(q_norm, f_norm)  # ... by 1/s in mlp_norm, and s in the gate rows:
  f_gate = f_norm[:, None] * np.asarray(tiny_model.blocks[0].mlp.gate.kernel[...])
  q_gate = q_norm[:, None] * np.asarray(awq.blocks[0].mlp.gate.dequantized_kernel())
  rel = np.linalg.norm(q_gate - f_gate) / np.linalg.norm(f_gate)
  assert rel < 0.1, rel  # the same product up to int4 error (~5% for group 64)


def test_rejects_unknown_weights(tiny_model):
  with pytest.raises(ValueError, match="awq"):
    quantize_generate_weights(tiny_model, "int3")


@pytest.fixture(scope="module")
def awq_bundle(tiny_model, tmp_path_factory):
  """The AWQ bundle for CPU and CUDA (one prefill bucket keeps the export short)."""
  path = tmp_path_factory.mktemp("repo") / "decoder_awq" / "1"
  config = dataclasses.replace(GenerativeExportConfig.tiny(), weights="awq",
                               int4_group_size=GROUP, prefill_lengths=(128,),
                               platforms=("cpu", "cuda"))
  return export_generative(tiny_model, path, config, name="decoder_awq")


def test_bundle_records_int4_and_its_cuda_artifact_runs_the_kernel(awq_bundle):
  manifest = json.loads((awq_bundle / "manifest.json").read_text())
  assert manifest["quantization"] == "awq"
  assert manifest["extra"]["int4"]["group_size"] == GROUP
  packed = [p for p in manifest["params"] if p["path"].endswith("kernel_packed")]
  assert len(packed) == 7 and all(p["dtype"] == "uint8" for p in packed)
  sig = manifest["signatures"]["decode"]["artifacts"]
  cuda = jax.export.deserialize(bytearray((awq_bundle / sig["cuda"]).read_bytes()))
  cpu = jax.export.deserialize(bytearray((awq_bundle / sig["cpu"]).read_bytes()))
  calls = [line for line in cuda.mlir_module().splitlines() if TRITON_CUSTOM_CALL in line]
  # jit outlines one kernel call per distinct shape: gate/up, down, head (+ paged attention)
  assert sum(f'name = "int4_matmul_g{GROUP}"' in line for line in calls) == 3, calls
  assert TRITON_CUSTOM_CALL not in cpu.mlir_module()  # CPU runs the jnp reference


def test_served_awq_bundle_generates_over_grpc(awq_bundle, tiny_model, quantized):
  tok = ByteTokenizer()
  bundle_model = quantized[0]  # what the export did (calibration seed = export seed + 1)
  ids = [tok.encode(p) for p in PROMPTS]
  want = greedy_reference(bundle_model, ids, max_new_tokens=16, eos_id=tok.eos_id)
  float_ids = greedy_reference(tiny_model, ids, max_new_tokens=16, eos_id=tok.eos_id)
  with serving(awq_bundle.parent.parent) as bg:
    client = tc.InferenceServerClient(bg.address)
    got = []
    for prompt in PROMPTS:
      (inp,) = triton_inputs({"text_input": np.array([prompt.encode()], dtype=object)})
      res = client.infer("decoder_awq", [inp], parameters={"max_tokens": 16})
      got.append(res.as_numpy("text_output")[0])
  assert got == [tok.decode_bytes(w) for w in want]
  agreement = greedy_agreement(float_ids, want)
  assert agreement >= AGREEMENT_FLOOR, agreement


@pytest.mark.slow  # a variant: opt in with --run-slow
def test_fp8_weight_bundle_serves_its_greedy_reference(tiny_model, tmp_path):
  """fp8 weights through the existing path (export.quantize, quantized_matmul "fp8") serve."""
  config = dataclasses.replace(GenerativeExportConfig.tiny(), weights="fp8",
                               prefill_lengths=(128,), platforms=("cpu", "cuda"))
  path = export_generative(tiny_model, tmp_path / "decoder_fp8" / "1", config, name="decoder_fp8")
  manifest = json.loads((path / "manifest.json").read_text())
  assert manifest["quantization"] == "fp8"
  assert sum(p["dtype"] == "float8_e4m3fn" for p in manifest["params"]) == 7
  cuda = jax.export.deserialize(bytearray(
      (path / manifest["signatures"]["decode"]["artifacts"]["cuda"]).read_bytes()))
  assert 'name = "quantized_matmul_fp8"' in cuda.mlir_module()
  fp8_model, _ = quantize_generate_weights(tiny_model, "fp8")
  tok = ByteTokenizer()
  want = greedy_reference(fp8_model, [tok.encode(PROMPTS[0])], max_new_tokens=12,
                          eos_id=tok.eos_id)[0]
  with serving(tmp_path) as bg:
    (inp,) = triton_inputs({"text_input": np.array([PROMPTS[0].encode()], dtype=object)})
    res = tc.InferenceServerClient(bg.address).infer("decoder_fp8", [inp],
                                                     parameters={"max_tokens": 12})
  assert res.as_numpy("text_output")[0] == tok.decode_bytes(want)
