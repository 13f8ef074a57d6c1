"""Building blocks shared by the models: dense layers and MLPs with logical axis names.

Parameters carry `logical_axes` metadata; `sharding/` maps those names to mesh axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class Dense(nnx.Module):
  """y = x @ kernel + bias, with the kernel's axes named for sharding rules."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rngs: nnx.Rngs,
      axes: tuple[str, str] = ("embed", "mlp"),
      use_bias: bool = True,
      dtype: jnp.dtype = jnp.float32,
  ):
    scale = (2.0 / (in_features + out_features)) ** 0.5
    self.kernel = nnx.Param(
        scale * jax.random.normal(rngs.params(), (in_features, out_features), dtype),
        logical_axes=axes,
    )
    self.bias = (
        nnx.Param(jnp.zeros((out_features,), dtype), logical_axes=(axes[1],))
        if use_bias
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., in] -> [..., out]
    y = jnp.einsum("...i,io->...o", x, self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class MLP(nnx.Module):
  """Stack of Dense layers, ReLU between them (not after the last).

  Kernels alternate ("embed", "mlp") and ("mlp", "embed") so a tensor-parallel
  plan makes each pair column-then-row parallel (one all-reduce per pair).
  """

  def __init__(
      self,
      in_features: int,
      features: Sequence[int],
      *,
      rngs: nnx.Rngs,
      final_activation: bool = False,
  ):
    self.final_activation = final_activation
    dims = (in_features, *features)
    self.layers = nnx.List([
        Dense(
            dims[i],
            dims[i + 1],
            rngs=rngs,
            axes=("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"),
        )
        for i in range(len(features))
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < n - 1 or self.final_activation:
        x = jax.nn.relu(x)
    return x
