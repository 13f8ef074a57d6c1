"""flash_attention: reference against hand-worked numbers, kernel against reference.

The kernel tests live in `TestFlashAttention`, which needs a CUDA GPU; the
`TestFlashAttentionInterpret` subclass runs them all on CPU in interpret mode.
Interpret mode fills every output buffer with NaN before the kernel runs (checked
by `test_interpret_mode_poisons_unwritten_outputs`), so `_check` asserting a
finite result proves every output element was written.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import (
    BlockSizes,
    default_block_sizes,
    flash_attention,
    flash_attention_reference,
)
from pallas_kernels.tuned_block_sizes import (
    TUNED_BLOCK_SIZES,
    flash_shape_class,
)

LN3 = math.log(3.0)

# Kernel vs reference, per input dtype. float32: both sides do float32 math and
# differ only in summation order (online vs one-shot softmax): <= 1e-6 seen, so
# 2e-5 leaves a 20x margin. bfloat16: the kernel feeds bfloat16 probabilities
# to the PV matmul, as flash attention does (<= 2^-9 max|v| ~ 6e-3 for these
# normal inputs), and both outputs are rounded to bfloat16, so they may land one
# ulp apart: 1.6e-2 for |out| in [2, 4) (|out| <= max|v| ~ 4). 7.8e-3 seen here
# and 1.6e-2 in the paged int8 sweep; atol 2e-2 + rtol 1e-2 admits 2-3 ulps.
TOLERANCES = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=1e-2),
}

# Interpret mode costs about 0.1 ms per grid step: keep every call well below.
MAX_GRID_STEPS = 400


def _random_qkv(rng, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype):
  q = rng.standard_normal((batch, heads, seq_q, head_dim), np.float32)
  k = rng.standard_normal((batch, kv_heads, seq_k, head_dim), np.float32)
  v = rng.standard_normal((batch, kv_heads, seq_k, head_dim), np.float32)
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _random_lengths(rng, batch, seq):
  """Per-sequence lengths that always include 1 and the full length."""
  lengths = rng.integers(1, seq + 1, size=batch)
  lengths[0] = 1
  if batch > 1:
    lengths[1] = seq
  return jnp.asarray(lengths, jnp.int32)


def _assert_close(actual, expected, dtype):
  np.testing.assert_allclose(
      np.asarray(actual, np.float32), np.asarray(expected, np.float32),
      **TOLERANCES[dtype])


class TestFlashAttentionReference:
  """The reference itself, against numbers worked out by hand."""

  # logits [0, ln 3] -> weights [1/4, 3/4] -> 1/4 [4, 0] + 3/4 [0, 8] = [1, 6].
  K2 = [[[[0.0, 0.0], [LN3, 0.0]]]]  # [1, 1, 2, 2]
  V2 = [[[[4.0, 0.0], [0.0, 8.0]]]]

  HAND_CASES = {
      "two_keys": (
          dict(q=[[[[1.0, 0.0]]]], k=K2, v=V2, sm_scale=1.0),
          [[[[1.0, 6.0]]]]),
      # Query 0 sees key 0 only; query 1 sees both.
      "causal": (
          dict(q=[[[[1.0, 0.0], [1.0, 0.0]]]], k=K2, v=V2, sm_scale=1.0,
               causal=True),
          [[[[4.0, 0.0], [1.0, 6.0]]]]),
      # Length 1: key 1 is masked, so query 0 gets v0; query 1 is padding -> 0.
      "lengths": (
          dict(q=[[[[1.0, 0.0], [1.0, 0.0]]]], k=K2, v=V2, sm_scale=1.0,
               lengths=[1]),
          [[[[4.0, 0.0], [0.0, 0.0]]]]),
      # Two query heads share one kv head; q = 0 weighs both keys equally.
      "gqa": (
          dict(q=[[[[1.0, 0.0]], [[0.0, 0.0]]]], k=K2, v=V2, sm_scale=1.0),
          [[[[1.0, 6.0]], [[2.0, 4.0]]]]),
      # Default sm_scale 1/sqrt(4) = 1/2 turns q.k = [0, 2 ln 3] into [0, ln 3].
      "default_scale": (
          dict(q=[[[[2.0, 0.0, 0.0, 0.0]]]],
               k=[[[[0.0, 0.0, 0.0, 0.0], [LN3, 0.0, 0.0, 0.0]]]],
               v=[[[[4.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]]]]),
          [[[[1.0, 6.0, 0.0, 0.0]]]]),
  }

  @staticmethod
  def hand_case(name):
    kwargs, expected = TestFlashAttentionReference.HAND_CASES[name]
    kwargs = dict(kwargs)
    q, k, v = (jnp.asarray(kwargs.pop(n), jnp.float32) for n in "qkv")
    if "lengths" in kwargs:
      kwargs["lengths"] = jnp.asarray(kwargs["lengths"], jnp.int32)
    return q, k, v, kwargs, np.asarray(expected, np.float32)

  @pytest.mark.parametrize("name", sorted(HAND_CASES))
  def test_hand_worked(self, name):
    q, k, v, kwargs, expected = self.hand_case(name)
    out = flash_attention_reference(q, k, v, **kwargs)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)

  def test_impl_xla_and_auto_on_cpu_are_the_reference(self):
    rng = np.random.default_rng(0)
    q, k, v = _random_qkv(rng, 2, 4, 2, 24, 24, 32, jnp.float32)
    lengths = jnp.asarray([5, 24], jnp.int32)
    expected = flash_attention_reference(q, k, v, lengths=lengths, causal=True)
    # On a GPU impl="auto" runs the kernel (compared with the reference by TestFlashAttention).
    for impl in ("xla", "auto") if jax.default_backend() == "cpu" else ("xla",):
      out = flash_attention(q, k, v, lengths=lengths, causal=True, impl=impl)
      np.testing.assert_array_equal(out, expected)

  @pytest.mark.parametrize(
      "q_shape, k_shape, v_shape, lengths, match",
      [
          ((2, 4, 8, 32), (2, 4, 8), (2, 4, 8), None, "q.shape="),
          ((2, 4, 8, 32), (2, 4, 8, 32), (2, 4, 9, 32), None, "v.shape="),
          ((2, 4, 8, 32), (3, 4, 8, 32), (3, 4, 8, 32), None, "batch"),
          ((2, 4, 8, 32), (2, 4, 8, 16), (2, 4, 8, 16), None, "head_dim"),
          ((2, 4, 8, 32), (2, 3, 8, 32), (2, 3, 8, 32), None, "kv_heads"),
          ((2, 4, 0, 32), (2, 4, 8, 32), (2, 4, 8, 32), None, "non-empty"),
          ((2, 4, 8, 32), (2, 4, 8, 32), (2, 4, 8, 32), (3,), "lengths.shape="),
      ],
  )
  def test_rejects_bad_shapes(self, q_shape, k_shape, v_shape, lengths, match):
    q, k, v = (jnp.zeros(s, jnp.float32) for s in (q_shape, k_shape, v_shape))
    if lengths is not None:
      lengths = jnp.zeros(lengths, jnp.int32)
    for fn in (flash_attention, flash_attention_reference):
      with pytest.raises(ValueError, match=match):
        fn(q, k, v, lengths=lengths)

  def test_rejects_bad_dtypes_and_impl(self):
    q = jnp.zeros((1, 2, 8, 32), jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
      flash_attention(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match="lengths.dtype="):
      flash_attention(q, q, q, lengths=jnp.zeros((1,), jnp.float32))
    with pytest.raises(ValueError, match="impl="):
      flash_attention(q, q, q, impl="triton")

  @pytest.mark.parametrize(
      "kwargs", [dict(block_q=8), dict(block_k=48), dict(num_warps=3),
                 dict(num_stages=0)])
  def test_block_sizes_validate(self, kwargs):
    with pytest.raises(ValueError):
      BlockSizes(**kwargs)

  def test_tuned_lookup_falls_back(self):
    for kind in ("cpu", "*", "NVIDIA H100 80GB HBM3"):  # no float32 rows
      assert default_block_sizes(
          128, 64, jnp.float32, device_kind=kind) == BlockSizes()
    assert flash_shape_class(200, 48) == "s256_d64"
    assert flash_shape_class(5000, 128) == "long_d128"
    rows = [(key, sizes) for key, sizes in TUNED_BLOCK_SIZES.items()
            if key[1] == "flash_attention"]
    assert len(rows) > 1
    for (kind, _, shape_class, dtype), sizes in rows:
      if shape_class == "*":
        assert BlockSizes(**sizes) == BlockSizes()
        continue
      seq = {"s64": 64, "s256": 256, "s1024": 1024, "long": 4096}[
          shape_class.split("_")[0]]
      head_dim = int(shape_class.split("_d")[1])
      assert default_block_sizes(
          seq, head_dim, dtype, device_kind=kind) == BlockSizes(**sizes)


def test_interpret_mode_poisons_unwritten_outputs():
  """The premise of the finiteness checks: unwritten outputs read as NaN."""

  def kernel(o_ref):  # [16, 16], only the top half written
    o_ref[:8, :] = jnp.zeros((8, 16), jnp.float32)

  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
      interpret=True)()
  assert np.all(np.asarray(out[:8]) == 0)
  assert np.all(np.isnan(np.asarray(out[8:])))


# (batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype, lengths,
#  (block_q, block_k) or None for the tuned default)
SWEEP = [
    (1, 1, 1, 1, 1, 32, False, jnp.float32, False, (16, 16)),
    (1, 2, 1, 1, 1, 64, True, jnp.bfloat16, True, (16, 16)),
    (2, 4, 4, 16, 16, 64, False, jnp.float32, True, (16, 16)),
    (3, 4, 2, 33, 33, 32, True, jnp.float32, True, (16, 16)),
    (3, 4, 2, 33, 33, 32, True, jnp.bfloat16, True, (16, 16)),
    (2, 8, 1, 100, 100, 64, True, jnp.bfloat16, True, (32, 16)),
    (1, 4, 2, 128, 128, 64, False, jnp.bfloat16, False, (64, 32)),
    (3, 2, 2, 77, 77, 32, False, jnp.bfloat16, True, (16, 64)),
    (2, 4, 2, 256, 256, 64, True, jnp.float32, False, (64, 64)),
    (2, 4, 2, 200, 200, 64, False, jnp.float32, True, (64, 32)),
    (2, 2, 1, 20, 50, 32, False, jnp.float32, True, (16, 16)),
    (2, 2, 2, 50, 20, 64, True, jnp.bfloat16, False, (16, 16)),
    (3, 6, 3, 40, 40, 48, True, jnp.float32, True, (16, 32)),
    (2, 4, 4, 64, 64, 32, True, jnp.bfloat16, True, None),
    (4, 2, 1, 17, 17, 64, False, jnp.float32, True, None),
]


def _sweep_id(case):
  b, h, kvh, sq, sk, d, causal, dtype, lens, blocks = case
  return (f"b{b}_h{h}kv{kvh}_q{sq}k{sk}_d{d}_{'causal' if causal else 'full'}"
          f"_{jnp.dtype(dtype).name}{'_len' if lens else ''}"
          f"_{'x'.join(map(str, blocks)) if blocks else 'tuned'}")


class TestFlashAttention:
  """The kernel against the reference. Compiled: needs a CUDA GPU."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_gpu_unless_interpreted(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled Triton kernel needs a CUDA GPU")

  def kernel(self, *args, **kwargs):
    return flash_attention(
        *args, impl="pallas", interpret=self.INTERPRET, **kwargs)

  def _check(self, q, k, v, dtype, **kwargs):
    out = self.kernel(q, k, v, **kwargs)
    kwargs.pop("block_sizes", None)
    expected = flash_attention_reference(q, k, v, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32))), "unwritten output"
    _assert_close(out, expected, dtype)
    return out

  @pytest.mark.parametrize("name", sorted(TestFlashAttentionReference.HAND_CASES))
  def test_hand_worked(self, name):
    q, k, v, kwargs, expected = TestFlashAttentionReference.hand_case(name)
    out = self.kernel(q, k, v, block_sizes=BlockSizes(16, 16), **kwargs)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)

  @pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
  def test_matches_reference(self, case):
    batch, heads, kv_heads, seq_q, seq_k, head_dim, causal, dtype, with_lengths, blocks = case
    if blocks is not None:
      steps = pl.cdiv(seq_q, blocks[0]) * batch * heads
      assert steps <= MAX_GRID_STEPS, steps
    rng = np.random.default_rng(seq_q * 1000 + seq_k)
    q, k, v = _random_qkv(
        rng, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype)
    lengths = (_random_lengths(rng, batch, min(seq_q, seq_k))
               if with_lengths else None)
    block_sizes = None if blocks is None else BlockSizes(*blocks)
    out = self._check(q, k, v, dtype, lengths=lengths, causal=causal,
                      block_sizes=block_sizes)
    if lengths is not None:
      pad_rows = np.arange(seq_q)[None, :] >= np.asarray(lengths)[:, None]
      out = np.asarray(out, np.float32)
      assert not np.any(np.where(pad_rows[:, None, :, None], out, 0.0))

  def test_explicit_sm_scale(self):
    rng = np.random.default_rng(1)
    q, k, v = _random_qkv(rng, 1, 2, 2, 24, 24, 32, jnp.float32)
    self._check(q, k, v, jnp.float32, sm_scale=0.3, causal=True,
                block_sizes=BlockSizes(16, 16))

  @pytest.mark.parametrize("causal", [False, True])
  def test_padding_never_leaks(self, causal):
    """NaN in every padded position (q, k and v) must not reach the output."""
    rng = np.random.default_rng(2)
    q, k, v = _random_qkv(rng, 3, 4, 2, 40, 40, 32, jnp.float32)
    lengths = jnp.asarray([0, 40, 13], jnp.int32)
    pad = (jnp.arange(40)[None, :] >= lengths[:, None])[:, None, :, None]
    clean = flash_attention_reference(
        *(jnp.where(pad, 0.0, x) for x in (q, k, v)), lengths=lengths,
        causal=causal)
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    out = self.kernel(q, k, v, lengths=lengths, causal=causal,
                      block_sizes=BlockSizes(16, 16))
    assert np.all(np.asarray(out[0]) == 0), "length 0 must output zeros"
    _assert_close(out, clean, jnp.float32)
    _assert_close(flash_attention_reference(q, k, v, lengths=lengths,
                                            causal=causal), clean, jnp.float32)

  def test_block_sizes_do_not_change_the_result(self):
    rng = np.random.default_rng(3)
    q, k, v = _random_qkv(rng, 1, 2, 1, 64, 64, 64, jnp.float32)
    lengths = jnp.asarray([50], jnp.int32)
    outs = [self.kernel(q, k, v, lengths=lengths, causal=True,
                        block_sizes=BlockSizes(bq, bk))
            for bq, bk in ((16, 64), (64, 16), (32, 32))]
    for out in outs[1:]:
      _assert_close(out, outs[0], jnp.float32)


class TestFlashAttentionInterpret(TestFlashAttention):
  INTERPRET = True
