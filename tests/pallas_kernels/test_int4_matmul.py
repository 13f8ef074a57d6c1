"""int4_matmul and the int4 quantize helpers, against hand-worked cases, the reference and numpy.

Shaped like test_quantized_matmul.py: `TestInt4Matmul` runs the compiled kernel and is skipped
without a GPU; `TestInt4MatmulInterpret` sets INTERPRET and runs the same sweep on CPU (interpret
mode leaves unwritten outputs NaN, so the finite checks prove every element is written).
Tolerances: kernel vs reference (same quantized weights, only summation order and, for bf16, the
product precision and output rounding differ) per output dtype below; the reference vs a numpy
float64 dequant-matmul to 1e-4 relative of the largest output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quantize_int4 as q4
from pallas_kernels.int4_matmul import BlockSizes, int4_matmul, int4_matmul_reference

TOLERANCES = {
    jnp.dtype(jnp.float32): dict(atol=1e-4, rtol=1e-4),
    jnp.dtype(jnp.bfloat16): dict(atol=5e-2, rtol=1e-2),
}


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _numpy_dequant_matmul(x, packed, scales, zeros, group_size):
  """Independent float64 numpy: unpack nibbles by the documented layout, dequantize, matmul."""
  p = np.asarray(packed).astype(np.int64)
  half = group_size // 2
  kp = 2 * p.shape[0]
  codes = np.empty((kp, p.shape[1]), np.int64)
  for row in range(p.shape[0]):
    g, j = divmod(row, half)
    codes[g * group_size + j] = p[row] & 15
    codes[g * group_size + half + j] = p[row] >> 4
  g_of_row = np.arange(kp) // group_size
  w = (codes - np.asarray(zeros, np.int64)[g_of_row]) * np.asarray(scales, np.float64)[g_of_row]
  xf = np.asarray(x, np.float64)
  return xf @ w[:xf.shape[1]]


def _problem(rng, m, k, n, group_size, dtype):
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
  return (x, *q4.quantize_int4_packed(w, group_size))


class TestReferenceAndHelpersByHand:
  """The reference and the quantize helpers on cases worked out by hand."""

  def test_reference(self):
    packed = np.zeros((16, 2), np.uint8)  # group 32 covers K=2 padded to 32
    packed[0] = [10 | 15 << 4, 3 | 15 << 4]  # row 0 low nibbles; high nibbles are padded row 16
    packed[1] = [6, 1]  # row 1
    scales = jnp.array([[0.5, 2.0]])
    zeros = jnp.array([[8, 0]], jnp.uint8)
    # w row 0 = [(10-8)*0.5, (3-0)*2] = [1, 6]; row 1 = [(6-8)*0.5, 1*2] = [-1, 2]
    # [1, 2] @ w = [1 - 2, 6 + 4] = [-1, 10]; padded rows meet zero activations.
    out = int4_matmul_reference(jnp.array([[1.0, 2.0]]), jnp.asarray(packed), scales, zeros,
                                group_size=32)
    np.testing.assert_array_equal(out, [[-1.0, 10.0]])

  def test_quantize_grouped_by_hand(self):
    w = jnp.zeros((32, 2)).at[0, 0].set(-1.0).at[1, 0].set(2.0).at[0, 1].set(3.0)
    codes, scales, zeros = q4.quantize_int4_grouped(w, 32)
    # column 0: min -1, max 2 -> scale 3/15 = 0.2, zero round(1/0.2) = 5; 2 -> 10 + 5 = 15
    # column 1: min 0 (zero included), max 3 -> scale 0.2, zero 0; 3 -> 15
    np.testing.assert_allclose(scales, [[0.2, 0.2]], rtol=1e-6)
    np.testing.assert_array_equal(zeros, [[5, 0]])
    np.testing.assert_array_equal(codes[:3], [[0, 15], [15, 0], [5, 0]])

  def test_pack_layout_and_round_trip(self):
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, (128, 3)), jnp.uint8)
    packed = q4.pack_int4(codes, 64)
    assert packed.shape == (64, 3) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(packed[33], codes[64 + 1] | codes[64 + 32 + 1] << 4)
    np.testing.assert_array_equal(q4.unpack_int4(packed, 64), codes)

  @pytest.mark.parametrize("group_size", [32, 64, 128])
  def test_round_trip_bound(self, group_size):
    w = jnp.asarray(np.random.default_rng(group_size).standard_normal((200, 24)), jnp.float32)
    codes, scales, zeros = q4.quantize_int4_grouped(w, group_size)
    assert codes.shape == (q4.padded_k(200, group_size), 24) and int(codes.max()) <= 15
    back = q4.dequantize_int4(codes, scales, zeros, group_size)[:200]
    step = np.repeat(np.asarray(scales), group_size, axis=0)[:200]
    # half a step from rounding, plus up to half a step from rounding the zero point
    assert (np.abs(back - w) <= step * (1 + 1e-5)).all()

  @pytest.mark.parametrize("group_size", [16, 48, 0])
  def test_rejects_bad_group_size(self, group_size):
    with pytest.raises(ValueError, match="group_size"):
      q4.quantize_int4_grouped(jnp.zeros((64, 2)), group_size)


class TestInt4Matmul:
  """The kernel against the reference and numpy; compiled on a GPU, interpreted in the subclass."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and not _on_gpu():
      pytest.skip("compiled Triton kernels need a GPU; the Interpret subclass covers CPU")

  def _run(self, *args, group_size, block_sizes=None, **kw):
    return int4_matmul(*args, group_size=group_size, block_sizes=block_sizes, impl="pallas",
                       interpret=self.INTERPRET, **kw)

  @pytest.mark.parametrize("m,k,n,group_size,dtype,blocks", [
      (1, 256, 64, 128, jnp.bfloat16, None),  # decode, default blocks
      (7, 200, 70, 64, jnp.float32, BlockSizes(16, 32, 128)),  # ragged M, K, N; 2 groups a step
      (40, 96, 48, 32, jnp.float32, BlockSizes(16, 32, 32)),  # several M blocks, K 3 groups
      (33, 256, 96, 64, jnp.bfloat16, BlockSizes(32, 64, 128)),
  ])
  def test_matches_reference_and_numpy(self, m, k, n, group_size, dtype, blocks):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, packed, scales, zeros = _problem(rng, m, k, n, group_size, dtype)
    out = self._run(x, packed, scales, zeros, group_size=group_size, block_sizes=blocks)
    ref = int4_matmul_reference(x, packed, scales, zeros, group_size=group_size)
    assert out.shape == ref.shape == (m, n) and out.dtype == ref.dtype == dtype
    out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out32).all(), "unwritten (NaN) output elements"
    np.testing.assert_allclose(out32, ref32, **TOLERANCES[jnp.dtype(dtype)])
    exact = _numpy_dequant_matmul(x, packed, scales, zeros, group_size)
    bound = 1e-4 * np.abs(exact).max() if dtype == jnp.float32 else 1e-2 * np.abs(exact).max()
    assert np.abs(ref32 - exact).max() <= bound

  @pytest.mark.slow
  @pytest.mark.parametrize("group_size", [32, 64, 128])
  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_group_and_dtype_sweep(self, group_size, dtype):
    rng = np.random.default_rng(group_size)
    x, packed, scales, zeros = _problem(rng, 17, 384, 80, group_size, dtype)
    out = self._run(x, packed, scales, zeros, group_size=group_size,
                    block_sizes=BlockSizes(16, 64, 256))
    ref = int4_matmul_reference(x, packed, scales, zeros, group_size=group_size)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               **TOLERANCES[jnp.dtype(dtype)])

  def test_out_dtype_and_close_to_float(self):
    """End to end: int4 (group 32) stays within its quantization error of the float matmul."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((128, 32)), jnp.float32)
    out = self._run(x, *q4.quantize_int4_packed(w, 32), group_size=32, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    exact = np.asarray(x, np.float32) @ np.asarray(w)
    assert np.abs(out - exact).max() < 0.15 * np.abs(exact).max()


class TestInt4MatmulInterpret(TestInt4Matmul):
  INTERPRET = True


class TestInt4MatmulApi:
  """Dispatch and validation; cheap (no kernel compiles)."""

  @pytest.mark.parametrize("impl", ["auto", "xla"])
  def test_auto_and_xla_use_reference_on_cpu(self, impl):
    if _on_gpu():
      pytest.skip("on a GPU impl='auto' runs the kernel")
    x, packed, scales, zeros = _problem(np.random.default_rng(5), 3, 64, 8, 32, jnp.float32)
    out = int4_matmul(x, packed, scales, zeros, group_size=32, impl=impl)
    np.testing.assert_array_equal(
        out, int4_matmul_reference(x, packed, scales, zeros, group_size=32))

  @pytest.mark.parametrize("shapes,group_size,match", [
      (((2, 64), (16, 4), (2, 4), (2, 4)), 32, "disagree on K"),
      (((2, 64), (32, 4), (1, 4), (2, 4)), 32, "scales.shape"),
      (((2, 64), (32, 4), (2, 4), (2, 5)), 32, "zeros.shape"),
      (((64,), (32, 4), (2, 4), (2, 4)), 32, "must be"),
      (((2, 64), (32, 4), (2, 4), (2, 4)), 24, "group_size"),
  ])
  def test_rejects_bad_shapes(self, shapes, group_size, match):
    xs, ps, ss, zs = shapes
    with pytest.raises(ValueError, match=match):
      int4_matmul(jnp.zeros(xs), jnp.zeros(ps, jnp.uint8), jnp.ones(ss), jnp.zeros(zs, jnp.uint8),
                  group_size=group_size)

  def test_rejects_bad_dtypes(self):
    with pytest.raises(ValueError, match="packed.dtype"):
      int4_matmul(jnp.zeros((2, 64)), jnp.zeros((32, 4), jnp.int8), jnp.ones((2, 4)),
                  jnp.zeros((2, 4), jnp.uint8), group_size=32)
    with pytest.raises(ValueError, match="x.dtype"):
      int4_matmul(jnp.zeros((2, 64), jnp.int8), jnp.zeros((32, 4), jnp.uint8), jnp.ones((2, 4)),
                  jnp.zeros((2, 4), jnp.uint8), group_size=32)

  @pytest.mark.parametrize("field,value", [("block_m", 24), ("block_k", 8), ("num_warps", 3)])
  def test_block_sizes_validate(self, field, value):
    with pytest.raises(ValueError, match=field):
      BlockSizes(**{field: value})
