"""GPU bundles: one fixed-batch artifact per bucket carrying the Triton kernels (no GPU needed)."""

import jax
import pytest
from flax import nnx

import export
from bundle import find_artifact, read_manifest
from models.dlrm import DLRM, DLRMConfig

TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("quantization", ["none", pytest.param("int8+int8_tables",
                                                         marks=pytest.mark.slow)])
def test_cuda_artifacts_have_static_batch_and_triton_kernels(tmp_path, quantization):
  model = DLRM(DLRMConfig.tiny(), rngs=nnx.Rngs(0))
  path = export.export_model(
      model, repository=tmp_path, name="dlrm",
      inputs=[export.Input("dense", "float32", ("batch", 13)),
              export.Input("sparse", "int64", ("batch", 26))],
      config=export.ExportConfig(batch_buckets=(1, 8), platforms=("cpu", "cuda"),
                                 quantization=quantization, reserve_batch_buckets=(16,)))
  manifest = read_manifest(path)
  sig = manifest.signatures["serve"]
  # 16 is a reserve bucket: a CUDA artifact the server compiles only where batch time is flat
  assert sorted(sig.artifacts) == ["cpu", "cuda@b1", "cuda@b16", "cuda@b8"]
  assert manifest.batch_buckets == (1, 8)
  for bucket in (1, 8, 16):
    fname = find_artifact(sig.artifacts, "cuda", batch=bucket)
    exp = jax.export.deserialize(bytearray((path / fname).read_bytes()))
    assert exp.platforms == ("cuda",)
    assert exp.in_avals[1][0].shape[0] == bucket if isinstance(exp.in_avals[1], tuple) else True
    assert TRITON in exp.mlir_module(), f"bucket {bucket}: no Triton kernel in the CUDA artifact"
  cpu = jax.export.deserialize(bytearray((path / sig.artifacts["cpu"]).read_bytes()))
  assert TRITON not in cpu.mlir_module()
  assert find_artifact(sig.artifacts, "cpu", batch=8) == sig.artifacts["cpu"]


def test_reserve_buckets_must_lie_above_the_largest_bucket():
  with pytest.raises(ValueError, match="above the largest batch bucket 8"):
    export.ExportConfig(batch_buckets=(1, 8), reserve_batch_buckets=(8, 16))
  with pytest.raises(ValueError, match="strictly increasing"):
    export.ExportConfig(batch_buckets=(1, 8), reserve_batch_buckets=(32, 16))
