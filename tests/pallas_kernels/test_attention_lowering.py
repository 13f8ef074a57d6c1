"""flash_attention and paged_attention lower and export for CUDA with no GPU.

A CUDA lowering of impl="pallas" or impl="auto" must carry the Triton custom call
(so the Triton back end, not Mosaic GPU, was chosen), and `jax.export` for
("cuda",) must serialize once the Triton custom call is allowed (Triton IR has
no compatibility guarantee). The last test compiles the captured Triton IR to an
sm_90 cubin with the `triton` package, which catches what lowering alone does
not (non-power-of-two tiles, dot shapes, shared memory).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
S = jax.ShapeDtypeStruct


def _flash(q, k, v, lengths, *, impl):
  return flash_attention(q, k, v, lengths=lengths, causal=True, impl=impl)


def _flash_f32(q, k, v, *, impl):
  return flash_attention(q, k, v, impl=impl)


def _paged(q, k_pages, v_pages, page_table, lengths, *, impl):
  return paged_attention(q, k_pages, v_pages, page_table, lengths, impl=impl)


def _paged_int8(q, k_pages, v_pages, page_table, lengths, k_scale, v_scale, *,
                impl):
  return paged_attention(q, k_pages, v_pages, page_table, lengths,
                         k_scale=k_scale, v_scale=v_scale, impl=impl)


# name -> (function of the inputs and `impl`, input specs, pallas_call name)
CASES = {
    # Decoder prefill: bf16, GQA 8 -> 2, unaligned seq, per-sequence lengths.
    "flash_bf16_causal": (_flash, (
        S((2, 8, 200, 64), jnp.bfloat16), S((2, 2, 200, 64), jnp.bfloat16),
        S((2, 2, 200, 64), jnp.bfloat16), S((2,), jnp.int32)),
        "flash_attention_fwd"),
    # Cross-encoder shape, f32, no lengths.
    "flash_f32": (_flash_f32, (S((4, 4, 40, 32), jnp.float32),) * 3,
                  "flash_attention_fwd"),
    "paged_bf16": (_paged, (
        S((3, 8, 64), jnp.bfloat16), S((2, 37, 16, 64), jnp.bfloat16),
        S((2, 37, 16, 64), jnp.bfloat16), S((3, 5), jnp.int32),
        S((3,), jnp.int32)), "paged_attention_decode"),
    "paged_int8": (_paged_int8, (
        S((3, 8, 64), jnp.bfloat16), S((2, 37, 16, 64), jnp.int8),
        S((2, 37, 16, 64), jnp.int8), S((3, 5), jnp.int32), S((3,), jnp.int32),
        S((2, 37, 16), jnp.float32), S((2, 37, 16), jnp.float32)),
        "paged_attention_decode"),
}


def _lower_text(name, impl, platform="cuda"):
  fn, specs, _ = CASES[name]
  traced = jax.jit(functools.partial(fn, impl=impl)).trace(*specs)
  return traced.lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("impl", ["pallas", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_lowers_to_triton_for_cuda(name, impl):
  text = _lower_text(name, impl)
  assert TRITON_CALL in text
  assert f'name = "{CASES[name][2]}"' in text


@pytest.mark.parametrize("name", ["flash_f32", "paged_int8"])
def test_reference_paths_have_no_triton_call(name):
  assert TRITON_CALL not in _lower_text(name, "xla")
  assert TRITON_CALL not in _lower_text(name, "auto", platform="cpu")


@pytest.mark.parametrize("name", sorted(CASES))
def test_exports_for_cuda(name):
  fn, specs, _ = CASES[name]
  exported = jax.export.export(
      jax.jit(functools.partial(fn, impl="auto")), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
  )(*specs)
  blob = exported.serialize()
  restored = jax.export.deserialize(blob)
  assert restored.platforms == ("cuda",)
  assert TRITON_CALL in restored.mlir_module()
  assert restored.out_avals[0].shape == specs[0].shape


def test_export_refuses_triton_without_the_disabled_check():
  fn, specs, _ = CASES["flash_f32"]
  with pytest.raises(ValueError, match="no compatibility guarantees"):
    jax.export.export(jax.jit(functools.partial(fn, impl="pallas")),
                      platforms=("cuda",))(*specs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_triton_ir_compiles_for_sm90(name, monkeypatch, tmp_path):
  monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
  triton = pytest.importorskip("triton")
  from triton.backends.compiler import GPUTarget
  # Private jax API: the hook that builds the Triton module for a pallas_call.
  from jax._src.pallas.triton import lowering as triton_lowering

  captured = []
  build = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = build(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", capture)
  _lower_text(name, "pallas")
  assert len(captured) == 1
  path = tmp_path / f"{name}.ttir"
  path.write_text(captured[0])
  kernel = triton.compile(
      str(path), target=GPUTarget("cuda", 90, 32),
      options=dict(num_warps=4, num_stages=2))
  assert kernel.asm["cubin"]
  assert kernel.metadata.shared <= 227 * 1024  # H100 shared memory per block
