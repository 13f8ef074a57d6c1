"""CUDA lowering of quantized_matmul, int4_matmul and embedding_bag on a machine without a GPU.

Each kernel must lower to the `__gpu$xla.gpu.triton` custom call (impl="pallas" and impl="auto"),
its Triton IR must compile for sm_90 with the `triton` package (registers and shared memory within
H100 limits), and a CUDA `jax.export` of it must serialize.
"""

from __future__ import annotations

import functools
import pathlib
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import lowering
from pallas_kernels.embedding_bag import BlockSizes as BagBlocks
from pallas_kernels.embedding_bag import embedding_bag, embedding_bag_multi
from pallas_kernels.int4_matmul import int4_matmul
from pallas_kernels.quantized_matmul import BlockSizes as MatmulBlocks
from pallas_kernels.quantized_matmul import quantized_matmul

S = jax.ShapeDtypeStruct
H100_MAX_REGISTERS = 255  # per thread
H100_MAX_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum


def _matmul(mode, w_dtype, m=16, blocks=None):
  fn = lambda impl: functools.partial(quantized_matmul, mode=mode, impl=impl, block_sizes=blocks)
  return fn, (S((m, 512), jnp.bfloat16), S((512, 256), w_dtype), S((256,), jnp.float32))


def _int4(m, group_size=128, k=512, n=256):
  fn = lambda impl: functools.partial(int4_matmul, group_size=group_size, impl=impl)
  groups = k // group_size
  return fn, (S((m, k), jnp.bfloat16), S((k // 2, n), jnp.uint8), S((groups, n), jnp.float32),
              S((groups, n), jnp.uint8))


def _bag_quantized(impl):
  return lambda t, i, s, o: embedding_bag(t, i, combiner="mean", scale=s, offset=o, impl=impl)


# name -> (impl -> function, specs, number of Triton kernels expected)
KERNELS = {
    "matmul_w8a16": (*_matmul("w8a16", jnp.int8), 1),
    "matmul_w8a8": (
        *_matmul("w8a8", jnp.int8, m=256, blocks=MatmulBlocks(128, 128, 64, num_warps=8)), 1),
    "matmul_fp8": (*_matmul("fp8", jnp.float8_e4m3fn, m=1), 1),
    "matmul_int4_decode": (*_int4(1), 1),
    "matmul_int4_g32": (*_int4(256, group_size=32), 1),
    "embedding_bag": (
        lambda impl: functools.partial(embedding_bag, impl=impl),
        (S((100_000, 64), jnp.float32), S((256, 32), jnp.int32)), 1),
    "embedding_bag_uint8": (
        _bag_quantized,
        (S((100_000, 64), jnp.uint8), S((256, 32), jnp.int32), S((100_000,), jnp.float32),
         S((100_000,), jnp.float32)), 1),
    "embedding_bag_multi_stacked": (
        lambda impl: functools.partial(embedding_bag_multi, impl=impl),
        (S((26, 1000, 64), jnp.bfloat16), S((512, 26, 32), jnp.int32)), 1),
    "embedding_bag_multi_list": (
        lambda impl: functools.partial(embedding_bag_multi, impl=impl),
        ([S((rows, 32), jnp.float32) for rows in (10, 200, 3000)], S((64, 3, 8), jnp.int32)), 3),
}


@pytest.mark.parametrize("impl", ["pallas", "auto"])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_to_triton_for_cuda(name, impl):
  make, specs, count = KERNELS[name]
  text = lowering.lower_for_cuda(make(impl), *specs)
  assert text.count(f"stablehlo.custom_call @{lowering.TRITON_CUSTOM_CALL}") == count


@pytest.mark.parametrize("name", ["matmul_w8a8", "matmul_int4_decode", "embedding_bag_uint8"])
def test_xla_impl_and_cpu_lowering_have_no_kernel(name):
  make, specs, _ = KERNELS[name]
  assert lowering.TRITON_CUSTOM_CALL not in lowering.lower_for_cuda(make("xla"), *specs)
  cpu_text = jax.jit(make("auto")).trace(*specs).lower(lowering_platforms=("cpu",)).as_text()
  assert lowering.TRITON_CUSTOM_CALL not in cpu_text


def test_triton_ir_extracted():
  make, specs, _ = KERNELS["matmul_w8a8"]
  [kernel] = lowering.triton_kernels(make("pallas"), *specs)
  assert kernel.name == "quantized_matmul_w8a8"
  assert kernel.grid == (2, 2, 1)  # M 256 / 128, N 256 / 128, no K split
  assert (kernel.num_warps, kernel.num_stages) == (8, 3)
  assert "tt.func public @quantized_matmul_w8a8" in kernel.ir
  assert re.search(r"tt\.dot .* -> tensor<128x128xi32>", kernel.ir), "int8 x int8 -> int32 MMA"


@functools.cache
def _compiled(name):
  pytest.importorskip("triton", reason="the `triton` package (test extra) compiles Triton IR")
  make, specs, _ = KERNELS[name]
  [kernel] = lowering.triton_kernels(make("pallas"), *specs)
  return lowering.compile_triton_kernel(kernel, arch=90)


@pytest.mark.parametrize("name", ["matmul_w8a16", "matmul_w8a8", "matmul_fp8",
                                  "matmul_int4_decode", "matmul_int4_g32", "embedding_bag_uint8"])
def test_compiles_for_sm90(name):
  compiled = _compiled(name)
  assert compiled.cubin[:4] == b"\x7fELF"
  assert 0 < compiled.registers <= H100_MAX_REGISTERS
  assert 0 <= compiled.shared_bytes <= H100_MAX_SHARED_BYTES
  assert compiled.stack_bytes == 0, "registers spilled to local memory"


@pytest.mark.parametrize("mode", ["w8a16", "w8a8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(16, 4096, 4096), (256, 512, 1024), (4096, 1024, 1024)])
def test_tuned_defaults_compile_without_spills(mode, m, k, n):
  """The table's fallback block sizes (decode, small, large) fit an H100 with no spills."""
  pytest.importorskip("triton", reason="the `triton` package (test extra) compiles Triton IR")
  w_dtype = jnp.float8_e4m3fn if mode == "fp8" else jnp.int8
  fn = functools.partial(quantized_matmul, mode=mode, impl="pallas")
  [kernel] = lowering.triton_kernels(
      fn, S((m, k), jnp.bfloat16), S((k, n), w_dtype), S((n,), jnp.float32))
  compiled = lowering.compile_triton_kernel(kernel, arch=90)
  assert compiled.registers <= H100_MAX_REGISTERS and compiled.stack_bytes == 0
  assert compiled.shared_bytes <= H100_MAX_SHARED_BYTES


def test_register_count_agrees_with_cuobjdump(tmp_path):
  triton = pytest.importorskip("triton")
  tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
  if not tool.exists():
    pytest.skip(f"{tool} is not shipped with this triton build")
  compiled = _compiled("matmul_w8a8")
  cubin = tmp_path / "kernel.cubin"
  cubin.write_bytes(compiled.cubin)
  usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
  assert f"REG:{compiled.registers} STACK:{compiled.stack_bytes} " in usage


def test_export_for_cuda_serializes():
  make, specs, _ = KERNELS["matmul_fp8"]
  exported = lowering.export_for_cuda(make("auto"), *specs)
  restored = jax.export.deserialize(exported.serialize())
  assert restored.platforms == ("cuda",)
  assert restored.in_avals == tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in specs)
  assert restored.out_avals == (jax.core.ShapedArray((1, 256), jnp.bfloat16),)
  assert lowering.TRITON_CUSTOM_CALL in restored.mlir_module()


def test_export_needs_the_triton_check_disabled():
  make, specs, _ = KERNELS["embedding_bag"]
  with pytest.raises(ValueError, match="no compatibility guarantees"):
    jax.export.export(jax.jit(make("pallas")), platforms=("cuda",))(*specs)


def test_bag_blocks_shape_the_grid():
  fn = functools.partial(embedding_bag_multi, impl="pallas", block_sizes=BagBlocks(16, 32))
  [kernel] = lowering.triton_kernels(fn, S((26, 1000, 64), jnp.float32), S((100, 26, 32),
                                                                          jnp.int32))
  assert kernel.grid == (7, 26, 2)  # ceil(100 / 16) bag blocks, 26 features, 64 / 32 columns


@pytest.mark.parametrize("m,k,n", [(16, 4096, 4096), (256, 512, 1024), (4096, 1024, 1024)])
def test_int4_default_blocks_compile_without_spills(m, k, n):
  """int4_matmul's default block sizes (decode, small, large) fit an H100 with no spills."""
  pytest.importorskip("triton", reason="the `triton` package (test extra) compiles Triton IR")
  make, specs = _int4(m, k=k, n=n)
  [kernel] = lowering.triton_kernels(make("pallas"), *specs)
  compiled = lowering.compile_triton_kernel(kernel, arch=90)
  assert compiled.registers <= H100_MAX_REGISTERS and compiled.stack_bytes == 0
  assert compiled.shared_bytes <= H100_MAX_SHARED_BYTES
