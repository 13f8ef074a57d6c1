"""Int4Dense: its output is x @ its dequantized kernel, also under a symbolic-batch export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.int4_dense import Int4Dense


def _layer(bias: bool) -> Int4Dense:
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(40), jnp.float32) if bias else None
  return Int4Dense(w, b, group_size=32, axes=("embed", "mlp"))


def test_matches_numpy_dequant_matmul_with_bias():
  layer = _layer(bias=True)
  x = np.random.default_rng(1).standard_normal((2, 3, 96)).astype(np.float32)
  want = x @ np.asarray(layer.dequantized_kernel()) + np.asarray(layer.bias[...])
  np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


def test_symbolic_batch_export_runs_the_reference():
  """As `export_model` traces (a symbolic batch): impl "auto" falls back to the reference."""
  layer = _layer(bias=False)
  graphdef, state = nnx.split(layer)
  (b,) = jax.export.symbolic_shape("b")
  exp = jax.export.export(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)), platforms=("cpu",))(
      state, jax.ShapeDtypeStruct((b, 96), jnp.float32))
  x = np.random.default_rng(2).standard_normal((5, 96)).astype(np.float32)
  np.testing.assert_allclose(exp.call(state, x), x @ np.asarray(layer.dequantized_kernel()),
                             rtol=1e-5, atol=1e-5)
