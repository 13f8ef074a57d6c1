"""quantized_matmul (W8A16, W8A8, fp8) and the quantize helpers, against hand-worked cases and the reference.

Shaped like jax's tests/pallas/gpu_ops_test.py: `TestQuantizedMatmul` runs the compiled kernel and is
skipped without a GPU; `TestQuantizedMatmulInterpret` sets INTERPRET and runs the same sweep on CPU.
Interpret mode fills every output element the kernel does not write with NaN (checked below), so the
finite-and-close assertions also prove that every element is written.
"""

from __future__ import annotations

import functools

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import quantize
from pallas_kernels.quantized_matmul import (
    MODES,
    BlockSizes,
    quantized_matmul,
    quantized_matmul_reference,
)

# Per output dtype: kernel vs reference (same quantized inputs; only accumulation order differs).
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=1e-4, rtol=1e-4),
    jnp.dtype(jnp.bfloat16): dict(atol=5e-2, rtol=1e-2),
}
ULP = 2.0**-23  # one float32 ulp, relative: the slack for a division on a GPU
SMALL_BLOCKS = BlockSizes(block_m=16, block_n=32, block_k=32)  # a few grid steps per call


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _weights(rng, k, n, mode):
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  if mode == "fp8":
    return quantize.quantize_fp8_per_channel(w, axis=-1)
  return quantize.quantize_int8_per_channel(w, axis=-1)


def _close(out, ref):
  assert out.shape == ref.shape and out.dtype == ref.dtype
  out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out32).all(), "unwritten (NaN) or overflowing output elements"
  np.testing.assert_allclose(out32, ref32, **TOLERANCES[jnp.dtype(out.dtype)])


class TestReferenceByHand:
  """quantized_matmul_reference on tiny cases whose numbers are worked out by hand."""

  def test_w8a16(self):
    x = jnp.array([[1.0, 2.0]])
    w_q = jnp.array([[1, -2], [3, 4]], jnp.int8)
    scale = jnp.array([0.5, 0.25])
    # x @ w_q = [1*1 + 2*3, 1*-2 + 2*4] = [7, 6]; times scales -> [3.5, 1.5]
    out = quantized_matmul_reference(x, w_q, scale, mode="w8a16")
    np.testing.assert_array_equal(out, [[3.5, 1.5]])

  def test_w8a8(self):
    x = jnp.array([[127.0, -63.5], [0.0, 0.0]])
    w_q = jnp.array([[1, 2], [2, -1]], jnp.int8)
    scale = jnp.array([1.0, 0.5])
    # Row 0: amax 127 -> row scale 1, codes [127, floor(-63.5 + 0.5) = -63] (ties round up).
    # int32 acc = [127*1 + -63*2, 127*2 + -63*-1] = [1, 317]; * 1 * [1, 0.5] -> [1, 158.5].
    # Row 1: all zeros -> amax 0 -> codes 0 -> output 0 (no division by zero).
    out = quantized_matmul_reference(x, w_q, scale, mode="w8a8")
    np.testing.assert_array_equal(out, [[1.0, 158.5], [0.0, 0.0]])

  def test_fp8(self):
    x = jnp.array([[2.0]])
    w_q = jnp.array([[1.5, -2.0]], jnp.float8_e4m3fn)  # both exact in e4m3
    scale = jnp.array([2.0, 0.5])
    # [2*1.5*2, 2*-2*0.5] = [6, -2]
    out = quantized_matmul_reference(x, w_q, scale, mode="fp8")
    np.testing.assert_array_equal(out, [[6.0, -2.0]])


class TestQuantizeHelpers:
  """Hand-worked quantize cases and dequantize round-trip error bounds."""

  def test_int8_per_channel_by_hand(self):
    w = jnp.array([[127.0, -254.0], [-63.0, 100.0]])
    w_q, scale = quantize.quantize_int8_per_channel(w, axis=-1)
    # column 0: amax 127 -> scale 1; column 1: amax 254 -> scale 2, 100 / 2 = 50
    np.testing.assert_array_equal(scale, [1.0, 2.0])
    np.testing.assert_array_equal(w_q, [[127, -127], [-63, 50]])
    assert w_q.dtype == jnp.int8
    w_q0, scale0 = quantize.quantize_int8_per_channel(w, axis=0)  # one scale per row
    np.testing.assert_allclose(scale0, [2.0, 100.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(w_q0[0], [64, -127])  # 127 / 2 = 63.5 -> 64 (half to even)

  def test_zero_channel(self):
    w_q, scale = quantize.quantize_int8_per_channel(jnp.zeros((3, 2)))
    np.testing.assert_array_equal(scale, [1.0, 1.0])
    np.testing.assert_array_equal(w_q, np.zeros((3, 2)))

  def test_activations_by_hand(self):
    x_q, scale = quantize.quantize_activations_int8(jnp.array([[254.0, -127.0, 1.0, -1.0]]))
    # scale 2; x / 2 = [127, -63.5, 0.5, -0.5] -> floor(v + 0.5) = [127, -63, 1, 0]
    np.testing.assert_array_equal(scale, [2.0])
    np.testing.assert_array_equal(x_q, [[127, -63, 1, 0]])

  def test_rows_by_hand(self):
    table = jnp.array([[0.0, 255.0, 51.0], [3.0, 3.0, 3.0]])
    q, scale, offset = quantize.quantize_rows_int8(table, jnp.uint8)
    np.testing.assert_array_equal(q, [[0, 255, 51], [0, 0, 0]])
    # 255 / 255: exact on CPU; XLA GPU divides to within an ulp (hence ULP, not equality).
    np.testing.assert_allclose(scale, [1.0, 1.0], rtol=ULP)
    np.testing.assert_array_equal(scale[1], 1.0)  # a constant row gets scale 1 ...
    np.testing.assert_array_equal(offset, [0.0, 3.0])  # ... and its value as offset: exact
    q8, scale8, offset8 = quantize.quantize_rows_int8(table, jnp.int8)
    np.testing.assert_array_equal(q8, [[-128, 127, -77], [-128, -128, -128]])
    np.testing.assert_allclose(offset8, [128.0, 131.0], rtol=ULP)
    np.testing.assert_allclose(quantize.dequantize_rows(q8, scale8, offset8), table,
                               rtol=2 * ULP, atol=1e-4)

  @pytest.mark.parametrize("axis", [0, -1])
  def test_int8_round_trip_bound(self, axis):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)) * 3, jnp.float32)
    w_q, scale = quantize.quantize_int8_per_channel(w, axis=axis)
    err = np.abs(quantize.dequantize_int8_per_channel(w_q, scale, axis=axis) - w)
    bound = np.expand_dims(scale, 1 - axis % 2) / 2 * (1 + 1e-5)  # half a step per channel
    assert (err <= bound).all()

  def test_fp8_round_trip_bound(self):
    w = jnp.asarray(np.random.default_rng(1).standard_normal((64, 48)), jnp.float32)
    w_q, scale = quantize.quantize_fp8_per_channel(w)
    assert w_q.dtype == jnp.float8_e4m3fn
    assert np.isfinite(np.asarray(w_q, np.float32)).all()
    np.testing.assert_allclose(np.abs(np.asarray(w_q, np.float32)).max(0), 448.0)
    err = np.abs(quantize.dequantize_fp8_per_channel(w_q, scale) - w)
    # 3 mantissa bits: half an ulp is 2**-4 relative; subnormals are spaced 2**-9 (times scale).
    assert (err <= 2.0**-4 * np.abs(w) + 2.0**-10 * scale[None, :] + 1e-7).all()

  @hypothesis.settings(max_examples=25, deadline=None)
  @hypothesis.given(
      table=hnp.arrays(np.float32, (4, 6), elements=dict(min_value=-1e3, max_value=1e3)),
      signed=hypothesis.strategies.booleans())
  def test_rows_round_trip_bound(self, table, signed):
    q, scale, offset = quantize.quantize_rows_int8(
        jnp.asarray(table), jnp.int8 if signed else jnp.uint8)
    err = np.abs(quantize.dequantize_rows(q, scale, offset) - table)
    assert (err <= np.asarray(scale)[:, None] * 0.5 + 1e-4 * np.abs(table).max() + 1e-6).all()


class TestQuantizedMatmul:
  """The kernel against the reference; runs compiled on a GPU, or interpreted in the subclass."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and not _on_gpu():
      pytest.skip("compiled Triton kernels need a GPU; the Interpret subclass covers CPU")

  def _run(self, x, w_q, scale, *, mode, block_sizes=SMALL_BLOCKS, **kw):
    return quantized_matmul(x, w_q, scale, mode=mode, block_sizes=block_sizes, impl="pallas",
                            interpret=self.INTERPRET, **kw)

  @pytest.mark.parametrize("mode", MODES)
  @pytest.mark.parametrize("m,k,n,dtype", [
      (1, 64, 64, jnp.float32),  # decode, aligned
      (1, 100, 70, jnp.bfloat16),  # decode, unaligned K and N
      (7, 33, 50, jnp.float32),  # everything unaligned
      (16, 256, 128, jnp.bfloat16),  # several K steps
      (40, 130, 96, jnp.float32),  # several M blocks
      (40, 130, 96, jnp.bfloat16),
  ])
  def test_matches_reference(self, mode, m, k, n, dtype):
    rng = np.random.default_rng(m * 1000 + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w_q, scale = _weights(rng, k, n, mode)
    out = self._run(x, w_q, scale, mode=mode)
    _close(out, quantized_matmul_reference(x, w_q, scale, mode=mode))

  @pytest.mark.parametrize("mode", MODES)
  def test_split_k(self, mode):
    split_k = 3  # 7 K blocks: the last split gets a short (zero-padded) share
    rng = np.random.default_rng(split_k)
    x = jnp.asarray(rng.standard_normal((3, 200)), jnp.float32)
    w_q, scale = _weights(rng, 200, 40, mode)
    blocks = BlockSizes(block_m=16, block_n=64, block_k=32, split_k=split_k)
    out = self._run(x, w_q, scale, mode=mode, block_sizes=blocks)
    _close(out, quantized_matmul_reference(x, w_q, scale, mode=mode))

  def test_out_dtype_and_defaults(self):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 48)), jnp.bfloat16)
    w_q, scale = _weights(rng, 48, 24, "w8a16")
    out = self._run(x, w_q, scale, mode="w8a16", block_sizes=None, out_dtype=jnp.float32)
    _close(out, quantized_matmul_reference(x, w_q, scale, mode="w8a16", out_dtype=jnp.float32))

  def test_w8a8_close_to_float(self):
    """End to end: W8A8 stays within int8 quantization error of the float matmul."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
    w_q, scale = quantize.quantize_int8_per_channel(w)
    out = self._run(x, w_q, scale, mode="w8a8")
    exact = np.asarray(x) @ np.asarray(w)
    assert np.abs(out - exact).max() < 0.02 * np.abs(exact).max()


class TestQuantizedMatmulInterpret(TestQuantizedMatmul):
  INTERPRET = True


class TestQuantizedMatmulApi:
  """Dispatch and validation; cheap (no kernel compiles)."""

  def test_interpret_poisons_unwritten_outputs(self):
    """The premise of the finite checks above: interpret mode leaves unwritten elements NaN."""

    def kernel(o_ref):
      @pl.when(pl.program_id(0) == 0)
      def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    out = pl.pallas_call(
        kernel, grid=(2,), out_specs=pl.BlockSpec((4,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)()
    np.testing.assert_array_equal(np.isnan(out), [False] * 4 + [True] * 4)

  @pytest.mark.parametrize("impl", ["auto", "xla"])
  def test_auto_and_xla_use_reference_on_cpu(self, impl):
    if _on_gpu():
      pytest.skip("on a GPU impl='auto' runs the kernel")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
    w_q, scale = _weights(rng, 40, 8, "w8a8")
    out = quantized_matmul(x, w_q, scale, mode="w8a8", impl=impl)
    np.testing.assert_array_equal(out, quantized_matmul_reference(x, w_q, scale, mode="w8a8"))

  @pytest.mark.parametrize("kwargs,match", [
      (dict(mode="w4a16"), "mode="),
      (dict(mode="fp8"), "w_q.dtype"),
      (dict(mode="w8a16", impl="triton"), "impl="),
  ])
  def test_rejects_bad_arguments(self, kwargs, match):
    x, w_q, scale = jnp.zeros((2, 8)), jnp.zeros((8, 4), jnp.int8), jnp.ones((4,))
    with pytest.raises(ValueError, match=match):
      quantized_matmul(x, w_q, scale, **kwargs)

  @pytest.mark.parametrize("shapes,match", [
      (((2, 8), (9, 4), (4,)), "disagree on K"),
      (((2, 8), (8, 4), (3,)), "w_scale.shape"),
      (((8,), (8, 4), (4,)), "must be"),
  ])
  def test_rejects_bad_shapes(self, shapes, match):
    (xs, ws, ss) = shapes
    with pytest.raises(ValueError, match=match):
      quantized_matmul(jnp.zeros(xs), jnp.zeros(ws, jnp.int8), jnp.ones(ss), mode="w8a16")

  def test_rejects_int_activations(self):
    with pytest.raises(ValueError, match="x.dtype"):
      quantized_matmul(jnp.zeros((2, 8), jnp.int8), jnp.zeros((8, 4), jnp.int8), jnp.ones((4,)),
                       mode="w8a8")

  @pytest.mark.parametrize("field,value", [("block_m", 24), ("block_k", 8), ("split_k", 0)])
  def test_block_sizes_validate(self, field, value):
    with pytest.raises(ValueError, match=field):
      BlockSizes(**{field: value})

  def test_tuned_lookup_falls_back(self):
    from pallas_kernels import tuned_block_sizes  # pylint: disable=g-import-not-at-top
    entry = tuned_block_sizes.lookup("quantized_matmul", "decode", "w8a8:bfloat16",
                                     device_kind="Some Future GPU")
    assert BlockSizes(**entry).split_k >= 1
    with pytest.raises(KeyError):
      tuned_block_sizes.lookup("no_such_op", "*", "*")
