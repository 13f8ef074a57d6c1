"""paged_attention: reference against hand-worked numbers and against
flash_attention_reference, kernel against reference.

`TestPagedAttention` needs a CUDA GPU; `TestPagedAttentionInterpret` runs it on
CPU in interpret mode, where outputs start as NaN (see
test_flash_attention.test_interpret_mode_poisons_unwritten_outputs), so a finite
result proves every element was written. The caches are poisoned too: every
token slot past a sequence's length, and the page that unused page-table entries
point at, hold NaN (float caches) or NaN scales (int8 caches).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.paged_attention import (
    BlockSizes,
    default_block_sizes,
    paged_attention,
    paged_attention_reference,
)
from pallas_kernels.tuned_block_sizes import (
    TUNED_BLOCK_SIZES,
    paged_shape_class,
)

LN3 = math.log(3.0)

# Kernel vs reference, per query dtype; the reasoning of
# test_flash_attention.TOLERANCES holds here too (int8 values are exact in
# bfloat16 and the scales are applied in float32): float32 <= 5e-7 seen;
# bfloat16 at most one output ulp apart, 1.6e-2 seen for int8 caches.
TOLERANCES = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=1e-2),
}


def _assert_close(actual, expected, dtype):
  np.testing.assert_allclose(
      np.asarray(actual, np.float32), np.asarray(expected, np.float32),
      **TOLERANCES[dtype])


def _quantize(x):
  """float32 [..., head_dim] -> int8 values, float32 [...] per-token scales."""
  scale = np.maximum(np.abs(x).max(axis=-1), 1e-6) / 127.0
  return np.round(x / scale[..., None]).astype(np.int8), scale.astype(np.float32)


def _dequantize(x, scale):
  return x.astype(np.float32) * scale[..., None]


def _lengths(rng, batch, page_size, pages_per_seq):
  """Full, 1, one past a page boundary, 0, one short of a boundary, random."""
  max_len = page_size * pages_per_seq
  wanted = [max_len, 1, page_size + 1, 0, 2 * page_size - 1,
            int(rng.integers(1, max_len + 1))]
  wanted += list(rng.integers(0, max_len + 1, size=batch))
  return np.clip(np.asarray(wanted[:batch]), 0, max_len).astype(np.int32)


def _random_case(rng, *, batch, heads, kv_heads, head_dim, page_size,
                 pages_per_seq, dtype, cache):
  """Shuffled pages; returns clean inputs, poisoned inputs, both as kwargs."""
  num_pages = batch * pages_per_seq + 2  # + a spare page and a poison page
  q = rng.standard_normal((batch, heads, head_dim), np.float32)
  k = rng.standard_normal((kv_heads, num_pages, page_size, head_dim), np.float32)
  v = rng.standard_normal((kv_heads, num_pages, page_size, head_dim), np.float32)
  lengths = _lengths(rng, batch, page_size, pages_per_seq)
  perm = rng.permutation(num_pages)
  poison_page = perm[-1]
  page_table = perm[:batch * pages_per_seq].reshape(batch, pages_per_seq)
  used = np.arange(pages_per_seq)[None, :] * page_size < lengths[:, None]
  page_table = np.where(used, page_table, poison_page).astype(np.int32)

  # Token slots no sequence reads: past each length, and the poison page.
  unread = np.ones((num_pages, page_size), bool)
  for b in range(batch):
    for t in range(lengths[b]):
      unread[page_table[b, t // page_size], t % page_size] = False

  arrays = {}
  for name, x in (("k", k), ("v", v)):
    int8 = cache == "int8" or (cache == "int8_k" and name == "k")
    if int8:
      xq, scale = _quantize(x)
      arrays[name] = (xq, scale, np.where(unread, np.nan, scale))
    else:
      x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
      arrays[name] = (x, None, np.where(unread[..., None], np.nan, x))

  def kwargs(poisoned):
    out = dict(q=jnp.asarray(q, dtype), page_table=jnp.asarray(page_table),
               lengths=jnp.asarray(lengths))
    for name, (x, scale, bad) in arrays.items():
      if scale is None:
        out[f"{name}_pages"] = jnp.asarray(bad if poisoned else x, dtype)
      else:
        out[f"{name}_pages"] = jnp.asarray(x)
        out[f"{name}_scale"] = jnp.asarray(bad if poisoned else scale)
    return out

  return kwargs(False), kwargs(True)


def _call(fn, kw, **extra):
  kw = dict(kw)
  args = [kw.pop(n) for n in ("q", "k_pages", "v_pages", "page_table",
                              "lengths")]
  return fn(*args, **kw, **extra)


class TestPagedAttentionReference:
  """The reference itself, against numbers worked out by hand."""

  NAN = float("nan")
  # One kv head, three pages of one token each. The sequence reads page 2 then
  # page 0: logits [0, ln 3] -> weights [1/4, 3/4] -> [1, 6]. Page 1 is NaN and
  # only ever pointed at by unused page-table entries.
  K3 = [[[[LN3, 0.0]], [[NAN, NAN]], [[0.0, 0.0]]]]  # [1, 3, 1, 2]
  V3 = [[[[0.0, 8.0]], [[NAN, NAN]], [[4.0, 0.0]]]]

  HAND_CASES = {
      "two_pages": (
          dict(q=[[[1.0, 0.0]]], k_pages=K3, v_pages=V3,
               page_table=[[2, 0, 1]], lengths=[2]),
          [[[1.0, 6.0]]]),
      "length_one": (
          dict(q=[[[1.0, 0.0]]], k_pages=K3, v_pages=V3,
               page_table=[[2, 1, 1]], lengths=[1]),
          [[[4.0, 0.0]]]),
      "length_zero": (
          dict(q=[[[1.0, 0.0]]], k_pages=K3, v_pages=V3,
               page_table=[[1, 1, 1]], lengths=[0]),
          [[[0.0, 0.0]]]),
      # Two query heads share the kv head; q = 0 weighs both tokens equally.
      "gqa": (
          dict(q=[[[1.0, 0.0], [0.0, 0.0]]], k_pages=K3, v_pages=V3,
               page_table=[[2, 0, 1]], lengths=[2]),
          [[[1.0, 6.0], [2.0, 4.0]]]),
      # Both tokens in one page of two: order within a page is token order.
      "one_page_of_two": (
          dict(q=[[[1.0, 0.0]]], k_pages=[[[[0.0, 0.0], [LN3, 0.0]]]],
               v_pages=[[[[4.0, 0.0], [0.0, 8.0]]]], page_table=[[0]],
               lengths=[2]),
          [[[1.0, 6.0]]]),
      # int8 values times per-token scales give the "two_pages" cache.
      "int8": (
          dict(q=[[[1.0, 0.0]]],
               k_pages=[[[[1, 0]], [[0, 0]], [[0, 0]]]],
               k_scale=[[[LN3], [NAN], [1.0]]],
               v_pages=[[[[0, 4]], [[0, 0]], [[2, 0]]]],
               v_scale=[[[2.0], [NAN], [2.0]]],
               page_table=[[2, 0, 1]], lengths=[2]),
          [[[1.0, 6.0]]]),
  }

  @staticmethod
  def hand_case(name):
    kwargs, expected = TestPagedAttentionReference.HAND_CASES[name]
    kw = {}
    for key, value in kwargs.items():
      if key in ("page_table", "lengths"):
        kw[key] = jnp.asarray(value, jnp.int32)
      elif key.endswith("_pages") and "k_scale" in kwargs:
        kw[key] = jnp.asarray(value, jnp.int8)
      else:
        kw[key] = jnp.asarray(value, jnp.float32)
    return kw, np.asarray(expected, np.float32)

  @pytest.mark.parametrize("name", sorted(HAND_CASES))
  def test_hand_worked(self, name):
    kw, expected = self.hand_case(name)
    out = _call(paged_attention_reference, kw, sm_scale=1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)

  def test_default_sm_scale(self):
    # 1/sqrt(4) = 1/2 turns q.k = [0, 2 ln 3] into [0, ln 3].
    kw = dict(q=jnp.asarray([[[2.0, 0, 0, 0]]]),
              k_pages=jnp.asarray([[[[0.0, 0, 0, 0], [LN3, 0, 0, 0]]]]),
              v_pages=jnp.asarray([[[[4.0, 0, 0, 0], [0.0, 8, 0, 0]]]]),
              page_table=jnp.asarray([[0]], jnp.int32),
              lengths=jnp.asarray([2], jnp.int32))
    np.testing.assert_allclose(_call(paged_attention_reference, kw),
                               [[[1.0, 6.0, 0.0, 0.0]]], atol=1e-6)

  @pytest.mark.parametrize("page_size", [4, 16])
  def test_last_query_of_flash_attention(self, page_size):
    """A contiguous cache cut into shuffled pages gives the same attention as
    flash_attention_reference's row lengths[b] - 1."""
    rng = np.random.default_rng(page_size)
    batch, heads, kv_heads, seq, head_dim = 4, 8, 2, 64, 32
    q = rng.standard_normal((batch, heads, seq, head_dim), np.float32)
    k = rng.standard_normal((batch, kv_heads, seq, head_dim), np.float32)
    v = rng.standard_normal((batch, kv_heads, seq, head_dim), np.float32)
    lengths = np.asarray([seq, 1, page_size + 1, 37], np.int32)
    expected = flash_attention_reference(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
        lengths=jnp.asarray(lengths), causal=True)
    expected = np.asarray(expected)[np.arange(batch), :, lengths - 1]

    pages_per_seq = seq // page_size
    def to_pages(x):  # [b, kvh, s, d] -> [kvh, b * pages_per_seq, ps, d]
      x = x.reshape(batch, kv_heads, pages_per_seq, page_size, head_dim)
      return x.transpose(1, 0, 2, 3, 4).reshape(
          kv_heads, batch * pages_per_seq, page_size, head_dim)
    perm = rng.permutation(batch * pages_per_seq)  # logical page i -> perm[i]
    k_pages, v_pages = np.empty_like(to_pages(k)), np.empty_like(to_pages(v))
    k_pages[:, perm], v_pages[:, perm] = to_pages(k), to_pages(v)
    page_table = perm.reshape(batch, pages_per_seq).astype(np.int32)

    out = paged_attention_reference(
        jnp.asarray(q[np.arange(batch), :, lengths - 1]), jnp.asarray(k_pages),
        jnp.asarray(v_pages), jnp.asarray(page_table), jnp.asarray(lengths))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)

  def test_int8_close_to_float_cache(self):
    """Per-token absmax int8 rounds each value by <= max|row| / 254 (~1.2e-2
    for these normal rows); 1.3e-2 seen on the output, 3e-2 allowed."""
    rng = np.random.default_rng(5)
    clean, _ = _random_case(
        rng, batch=4, heads=8, kv_heads=2, head_dim=64, page_size=8,
        pages_per_seq=4, dtype=jnp.float32, cache="float")
    kq, ks = _quantize(np.asarray(clean["k_pages"]))
    vq, vs = _quantize(np.asarray(clean["v_pages"]))
    expected = _call(paged_attention_reference, clean)
    out = _call(paged_attention_reference,
                dict(clean, k_pages=jnp.asarray(kq), v_pages=jnp.asarray(vq)),
                k_scale=jnp.asarray(ks), v_scale=jnp.asarray(vs))
    np.testing.assert_allclose(out, expected, atol=3e-2)
    # And the int8 reference is exactly the float reference of the dequantized
    # cache.
    deq = dict(clean, k_pages=jnp.asarray(_dequantize(kq, ks)),
               v_pages=jnp.asarray(_dequantize(vq, vs)))
    np.testing.assert_allclose(out, _call(paged_attention_reference, deq),
                               atol=1e-6, rtol=1e-6)

  def test_impl_xla_and_auto_on_cpu_are_the_reference(self):
    clean, _ = _random_case(
        np.random.default_rng(6), batch=3, heads=4, kv_heads=2, head_dim=32,
        page_size=4, pages_per_seq=3, dtype=jnp.float32, cache="int8")
    expected = _call(paged_attention_reference, clean)
    # On a GPU impl="auto" runs the kernel (compared with the reference by TestPagedAttention).
    for impl in ("xla", "auto") if jax.default_backend() == "cpu" else ("xla",):
      np.testing.assert_array_equal(
          _call(paged_attention, clean, impl=impl), expected)

  @pytest.mark.parametrize(
      "change, match",
      [
          (dict(q=(2, 4, 8, 32)), "q.shape="),
          (dict(v_pages=(2, 6, 4, 16)), "v_pages.shape="),
          (dict(k_pages=(2, 6, 4, 16), v_pages=(2, 6, 4, 16)), "head_dim"),
          (dict(k_pages=(3, 6, 4, 32), v_pages=(3, 6, 4, 32)), "kv_heads"),
          (dict(k_pages=(2, 6, 3, 32), v_pages=(2, 6, 3, 32)), "page_size"),
          (dict(page_table=(3, 2)), "page_table.shape="),
          (dict(lengths=(3,)), "lengths.shape="),
      ],
  )
  def test_rejects_bad_shapes(self, change, match):
    shapes = dict(q=(2, 4, 32), k_pages=(2, 6, 4, 32), v_pages=(2, 6, 4, 32),
                  page_table=(2, 2), lengths=(2,))
    shapes.update(change)
    kw = {n: jnp.zeros(s, jnp.int32 if n in ("page_table", "lengths")
                       else jnp.float32) for n, s in shapes.items()}
    for fn in (paged_attention, paged_attention_reference):
      with pytest.raises(ValueError, match=match):
        _call(fn, kw)

  def test_rejects_bad_scales_and_dtypes(self):
    kw = dict(q=jnp.zeros((2, 4, 32)), k_pages=jnp.zeros((2, 6, 4, 32), jnp.int8),
              v_pages=jnp.zeros((2, 6, 4, 32), jnp.int8),
              page_table=jnp.zeros((2, 2), jnp.int32),
              lengths=jnp.zeros((2,), jnp.int32))
    scale = jnp.ones((2, 6, 4), jnp.float32)
    with pytest.raises(ValueError, match="needs k_scale"):
      _call(paged_attention, kw, v_scale=scale)
    with pytest.raises(ValueError, match="k_scale"):
      _call(paged_attention, kw, k_scale=scale[:, :, :2], v_scale=scale)
    with pytest.raises(ValueError, match="v_scale"):
      _call(paged_attention, kw, k_scale=scale, v_scale=scale.astype(jnp.bfloat16))
    floats = dict(kw, k_pages=jnp.zeros((2, 6, 4, 32)),
                  v_pages=jnp.zeros((2, 6, 4, 32)))
    with pytest.raises(ValueError, match="only for int8"):
      _call(paged_attention, floats, k_scale=scale)
    with pytest.raises(ValueError, match="page_table.dtype="):
      _call(paged_attention, dict(floats, page_table=jnp.zeros((2, 2))))
    with pytest.raises(ValueError, match="impl="):
      _call(paged_attention, floats, impl="cuda")

  @pytest.mark.parametrize(
      "kwargs", [dict(block_h=8), dict(block_h=24),
                 dict(pages_per_compute_block=3), dict(num_warps=6),
                 dict(num_stages=0)])
  def test_block_sizes_validate(self, kwargs):
    with pytest.raises(ValueError):
      BlockSizes(**kwargs)

  def test_tuned_lookup_falls_back(self):
    for kind in ("cpu", "*", "NVIDIA H100 80GB HBM3"):  # no page_size 8 rows
      assert default_block_sizes(
          8, 64, jnp.int8, device_kind=kind) == BlockSizes()
    assert paged_shape_class(16, 48) == "p16_d64"
    rows = [(key, sizes) for key, sizes in TUNED_BLOCK_SIZES.items()
            if key[1] == "paged_attention"]
    assert len(rows) > 1
    for (kind, _, shape_class, dtype), sizes in rows:
      if shape_class == "*":
        assert BlockSizes(**sizes) == BlockSizes()
        continue
      page_size, head_dim = (int(x) for x in shape_class[1:].split("_d"))
      assert default_block_sizes(
          page_size, head_dim, dtype, device_kind=kind) == BlockSizes(**sizes)


# (batch, heads, kv_heads, head_dim, page_size, pages_per_seq, q dtype, cache,
#  pages_per_compute_block or None for the tuned default)
SWEEP = [
    (1, 1, 1, 32, 16, 1, jnp.float32, "float", 8),
    (3, 4, 4, 32, 4, 6, jnp.float32, "float", 4),
    (4, 8, 2, 64, 8, 5, jnp.bfloat16, "float", 2),
    (4, 8, 1, 64, 16, 3, jnp.bfloat16, "float", None),
    (2, 32, 1, 32, 16, 2, jnp.float32, "float", 8),
    (3, 6, 2, 48, 8, 3, jnp.float32, "float", 2),
    (2, 4, 2, 64, 1, 20, jnp.bfloat16, "float", 16),
    (4, 4, 2, 32, 16, 4, jnp.float32, "int8", 2),
    (4, 8, 2, 64, 8, 4, jnp.bfloat16, "int8", 4),
    (2, 4, 4, 32, 32, 3, jnp.bfloat16, "int8", 1),
    (5, 4, 1, 64, 4, 7, jnp.float32, "int8_k", 2),
]


def _sweep_id(case):
  b, h, kvh, d, ps, pps, dtype, cache, ppcb = case
  return (f"b{b}_h{h}kv{kvh}_d{d}_ps{ps}x{pps}_{jnp.dtype(dtype).name}_{cache}"
          f"_{ppcb if ppcb else 'tuned'}")


class TestPagedAttention:
  """The kernel against the reference. Compiled: needs a CUDA GPU."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_gpu_unless_interpreted(self):
    if not self.INTERPRET and jax.default_backend() != "gpu":
      pytest.skip("the compiled Triton kernel needs a CUDA GPU")

  def kernel(self, kw, **extra):
    return _call(paged_attention, kw, impl="pallas", interpret=self.INTERPRET,
                 **extra)

  @pytest.mark.parametrize("name", sorted(TestPagedAttentionReference.HAND_CASES))
  def test_hand_worked(self, name):
    kw, expected = TestPagedAttentionReference.hand_case(name)
    out = self.kernel(kw, sm_scale=1.0)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)

  @pytest.mark.parametrize("case", SWEEP, ids=_sweep_id)
  def test_matches_reference(self, case):
    batch, heads, kv_heads, head_dim, page_size, pages_per_seq, dtype, cache, ppcb = case
    rng = np.random.default_rng(batch * 100 + page_size)
    clean, poisoned = _random_case(
        rng, batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pages_per_seq, dtype=dtype,
        cache=cache)
    expected = _call(paged_attention_reference, clean)
    block_sizes = None if ppcb is None else BlockSizes(
        pages_per_compute_block=ppcb)
    out = self.kernel(poisoned, block_sizes=block_sizes)
    assert out.shape == (batch, heads, head_dim) and out.dtype == dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32))), (
        "unwritten output or poison read")
    _assert_close(out, expected, dtype)
    lengths = np.asarray(clean["lengths"])
    assert np.all(np.asarray(out, np.float32)[lengths == 0] == 0)
    # The reference ignores the poison as well.
    np.testing.assert_array_equal(
        _call(paged_attention_reference, poisoned), expected)


class TestPagedAttentionInterpret(TestPagedAttention):
  INTERPRET = True
