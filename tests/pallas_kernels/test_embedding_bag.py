"""embedding_bag / embedding_bag_multi against hand-worked cases and the reference.

`TestEmbeddingBag` runs the compiled kernel (skipped without a GPU); `TestEmbeddingBagInterpret`
sets INTERPRET and runs the same sweep on CPU, where every unwritten output element is NaN (see
test_quantized_matmul.py's poison check), so the finite-and-close assertions prove full coverage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import quantize
from pallas_kernels.embedding_bag import (
    BlockSizes,
    embedding_bag,
    embedding_bag_multi,
    embedding_bag_multi_reference,
    embedding_bag_reference,
)

TOLERANCES = {  # per output dtype; the kernel and reference both accumulate in float32
    jnp.dtype(jnp.float32): dict(atol=1e-5, rtol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(atol=2e-2, rtol=1e-2),
}
SMALL_BLOCKS = BlockSizes(block_b=8, block_d=16)
TABLE_DTYPES = ("float32", "bfloat16", "uint8", "int8")


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _table(rng, rows, dim, kind):
  """(table, scale, offset) of the given kind; scale/offset only for row-quantized tables."""
  table = jnp.asarray(rng.standard_normal((rows, dim)), jnp.float32)
  if kind in ("uint8", "int8"):
    return quantize.quantize_rows_int8(table, jnp.dtype(kind))
  return table.astype(kind), None, None


def _ids(rng, batch, bag, rows, shape=None):
  """ids in [-1, 3 * rows): -1 padding, and ids >= rows that must wrap modulo rows."""
  ids = rng.integers(-1, 3 * rows, size=shape or (batch, bag))
  ids[0] = -1  # one bag with no valid id at all
  return jnp.asarray(ids, jnp.int32)


def _close(out, ref):
  assert out.shape == ref.shape and out.dtype == ref.dtype
  out32, ref32 = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.isfinite(out32).all(), "unwritten (NaN) output elements"
  np.testing.assert_allclose(out32, ref32, **TOLERANCES[jnp.dtype(out.dtype)])


class TestReferenceByHand:
  """embedding_bag_reference on tiny cases whose numbers are worked out by hand."""

  TABLE = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  IDS = jnp.array([[0, 2, -1], [4, -1, -1], [-1, -1, -1]], jnp.int32)

  def test_sum(self):
    # bag 0: rows 0 + 2 = [6, 8]; bag 1: id 4 -> row 4 % 3 = 1 = [3, 4]; bag 2: empty -> 0
    out = embedding_bag_reference(self.TABLE, self.IDS, combiner="sum")
    np.testing.assert_array_equal(out, [[6.0, 8.0], [3.0, 4.0], [0.0, 0.0]])

  def test_mean(self):
    # bag 0: [6, 8] / 2 valid ids; bag 1: one valid id; bag 2: no valid id -> zero vector
    out = embedding_bag_reference(self.TABLE, self.IDS, combiner="mean")
    np.testing.assert_array_equal(out, [[3.0, 4.0], [3.0, 4.0], [0.0, 0.0]])

  def test_row_quantized(self):
    q = jnp.array([[0, 10], [2, 4]], jnp.uint8)
    scale, offset = jnp.array([0.5, 2.0]), jnp.array([1.0, -1.0])
    # row 0 -> [0*.5+1, 10*.5+1] = [1, 6]; row 1 -> [2*2-1, 4*2-1] = [3, 7]
    ids = jnp.array([[0, 1], [1, -1]], jnp.int32)
    out = embedding_bag_reference(q, ids, combiner="sum", scale=scale, offset=offset)
    np.testing.assert_array_equal(out, [[4.0, 13.0], [3.0, 7.0]])
    out = embedding_bag_reference(q, ids, combiner="mean", scale=scale, offset=offset)
    np.testing.assert_array_equal(out, [[2.0, 6.5], [3.0, 7.0]])

  def test_multi(self):
    tables = [self.TABLE, 10 * self.TABLE[:2]]  # second table has 2 rows
    ids = jnp.array([[[1, -1], [3, 0]]], jnp.int32)  # feature 1: 3 % 2 = 1 and 0
    out = embedding_bag_multi_reference(tables, ids)
    np.testing.assert_array_equal(out, [[[3.0, 4.0], [40.0, 60.0]]])


class TestEmbeddingBag:
  """The kernel against the reference; runs compiled on a GPU, or interpreted in the subclass."""

  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _needs_backend(self):
    if not self.INTERPRET and not _on_gpu():
      pytest.skip("compiled Triton kernels need a GPU; the Interpret subclass covers CPU")

  def _kw(self, block_sizes=SMALL_BLOCKS):
    return dict(block_sizes=block_sizes, impl="pallas", interpret=self.INTERPRET)

  @pytest.mark.parametrize("combiner", ["sum", "mean"])
  @pytest.mark.parametrize("kind", TABLE_DTYPES)
  @pytest.mark.parametrize("rows,dim,batch,bag", [
      (10, 20, 5, 3),  # dim not a block multiple (masked), batch padded
      (50, 64, 17, 7),  # several batch and dim blocks
  ])
  def test_matches_reference(self, combiner, kind, rows, dim, batch, bag):
    rng = np.random.default_rng(rows + dim + batch)
    table, scale, offset = _table(rng, rows, dim, kind)
    ids = _ids(rng, batch, bag, rows)
    out = embedding_bag(table, ids, combiner=combiner, scale=scale, offset=offset, **self._kw())
    ref = embedding_bag_reference(table, ids, combiner=combiner, scale=scale, offset=offset)
    assert out.dtype == (jnp.float32 if kind in ("uint8", "int8") else jnp.dtype(kind))
    _close(out, ref)

  @pytest.mark.parametrize("rows,dim,batch,bag", [
      (7, 16, 1, 1),  # one bag of one id (serving a single request)
      (1, 8, 4, 5),  # a one-row table: every valid id maps to row 0
      (300, 128, 8, 32),  # a full CTR bag of 32 ids
  ])
  def test_shapes(self, rows, dim, batch, bag):
    rng = np.random.default_rng(bag)
    table, _, _ = _table(rng, rows, dim, "float32")
    ids = _ids(rng, batch, bag, rows)
    for combiner in ("sum", "mean"):
      _close(embedding_bag(table, ids, combiner=combiner, **self._kw()),
             embedding_bag_reference(table, ids, combiner=combiner))

  def test_padding_and_modulo_by_hand(self):
    """The hand-worked reference case, through the kernel."""
    table = TestReferenceByHand.TABLE
    ids = jnp.array([[0, 2, -1], [4, -1, -1], [-1, -1, -1], [-7, 5, 3]], jnp.int32)
    out = embedding_bag(table, ids, combiner="mean", **self._kw())
    # any negative id is padding; 5 % 3 = 2 -> [5, 6], 3 % 3 = 0 -> [1, 2]; mean [3, 4]
    np.testing.assert_array_equal(out, [[3.0, 4.0], [3.0, 4.0], [0.0, 0.0], [3.0, 4.0]])

  def test_default_block_sizes(self):
    rng = np.random.default_rng(9)
    table, _, _ = _table(rng, 40, 64, "float32")
    ids = _ids(rng, 6, 4, 40)
    _close(embedding_bag(table, ids, **self._kw(block_sizes=None)),
           embedding_bag_reference(table, ids))

  @pytest.mark.parametrize("kind", ["float32", "uint8"])
  def test_multi_stacked(self, kind):
    """Stacked tables: one fused kernel with a features grid axis."""
    rng = np.random.default_rng(11)
    parts = [_table(rng, 12, 24, kind) for _ in range(3)]
    tables = jnp.stack([p[0] for p in parts])
    scales = None if parts[0][1] is None else jnp.stack([p[1] for p in parts])
    offsets = None if parts[0][2] is None else jnp.stack([p[2] for p in parts])
    ids = _ids(rng, 5, 6, 12, shape=(5, 3, 6))
    out = embedding_bag_multi(tables, ids, combiner="mean", scales=scales, offsets=offsets,
                              **self._kw())
    ref = embedding_bag_multi_reference(tables, ids, combiner="mean", scales=scales,
                                        offsets=offsets)
    _close(out, ref)

  def test_multi_list_of_different_rows(self):
    """A list of per-feature tables of different sizes: one kernel per table."""
    rng = np.random.default_rng(12)
    tables = [_table(rng, rows, 16, "float32")[0] for rows in (5, 9, 30)]
    ids = _ids(rng, 4, 3, 5, shape=(4, 3, 3))
    out = embedding_bag_multi(tables, ids, **self._kw())
    _close(out, embedding_bag_multi_reference(tables, ids))


class TestEmbeddingBagInterpret(TestEmbeddingBag):
  INTERPRET = True


class TestEmbeddingBagApi:
  """Dispatch, int64 ids and validation; cheap."""

  @pytest.mark.parametrize("impl", ["auto", "xla"])
  def test_auto_and_xla_use_reference_on_cpu(self, impl):
    if _on_gpu():
      pytest.skip("on a GPU impl='auto' runs the kernel")
    table = TestReferenceByHand.TABLE
    ids = TestReferenceByHand.IDS
    np.testing.assert_array_equal(embedding_bag(table, ids, impl=impl),
                                  embedding_bag_reference(table, ids))

  def test_int64_ids_wrap_before_narrowing(self):
    """Hashed int64 ids beyond int32 are reduced modulo rows before the kernel sees int32."""
    with jax.enable_x64(True):
      table = jnp.arange(10.0, dtype=jnp.float32).reshape(5, 2)
      # mod 5, as 2**4 = 16 = 1: 2**40 + 2 -> 1 + 2 = row 3; 2**33 = 2**32 * 2 -> row 2; 7 -> row 2
      ids = jnp.array([[2**40 + 2, -1], [2**33, 7]], jnp.int64)
      for impl in ("pallas", "xla"):
        out = embedding_bag(table, ids, impl=impl, interpret=True, block_sizes=SMALL_BLOCKS)
        np.testing.assert_array_equal(out, [[6.0, 7.0], [8.0, 10.0]])

  @pytest.mark.parametrize("kwargs,match", [
      (dict(combiner="max"), "combiner="),
      (dict(scale=jnp.ones(3), offset=jnp.zeros(3)), "only for uint8/int8"),
      (dict(impl="cuda"), "impl="),
  ])
  def test_rejects_bad_arguments(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      embedding_bag(TestReferenceByHand.TABLE, TestReferenceByHand.IDS, **kwargs)

  def test_rejects_bad_quantized_args(self):
    q = jnp.zeros((3, 2), jnp.uint8)
    with pytest.raises(ValueError, match="needs per-row scale"):
      embedding_bag(q, TestReferenceByHand.IDS)
    with pytest.raises(ValueError, match="scale.shape"):
      embedding_bag(q, TestReferenceByHand.IDS, scale=jnp.ones(2), offset=jnp.zeros(3))

  def test_rejects_bad_ids(self):
    with pytest.raises(ValueError, match="ids.dtype"):
      embedding_bag(TestReferenceByHand.TABLE, jnp.zeros((2, 3), jnp.uint32))
    with pytest.raises(ValueError, match="ids.shape"):
      embedding_bag(TestReferenceByHand.TABLE, jnp.zeros((2, 3, 4), jnp.int32))
    with pytest.raises(ValueError, match="len\\(tables\\)"):
      embedding_bag_multi([TestReferenceByHand.TABLE], jnp.zeros((2, 3, 4), jnp.int32))

  @pytest.mark.parametrize("field,value", [("block_b", 12), ("block_d", 0), ("num_stages", 0)])
  def test_block_sizes_validate(self, field, value):
    with pytest.raises(ValueError, match=field):
      BlockSizes(**{field: value})
