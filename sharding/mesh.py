"""Mesh factory: one `data` x `model` mesh per strategy, with Auto axis types."""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.rules import DATA, MESH_AXES, MODEL, rules_for

logger = logging.getLogger(__name__)


def mesh_shape(strategy: str, num_devices: int, *, data: int | None = None) -> tuple[int, int]:
  """(data, model) sizes for `strategy` on `num_devices` devices.

  replicated: (n, 1) (n replicas, see `ShardingPlan.placements`); tensor, embedding_*: (1, n);
  tensor+data: `data` (default: the largest divisor of n not above sqrt(n)) x n/data.
  """
  rules_for(strategy)  # validates the name
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}")
  if strategy == "replicated":
    shape = (num_devices, 1)
  elif strategy == "tensor+data":
    if data is None:
      data = max(d for d in range(1, math.isqrt(num_devices) + 1) if num_devices % d == 0)
    shape = (data, num_devices // data)
  else:
    shape = (1, num_devices)
  if data is not None and shape[0] != data:
    raise ValueError(f"data={data} only applies to tensor+data, not {strategy!r}")
  if shape[0] * shape[1] != num_devices:
    raise ValueError(f"data={data} does not divide num_devices={num_devices}")
  return shape


def make_mesh(
    strategy: str,
    num_devices: int,
    devices: Sequence[jax.Device] | None = None,
    *,
    data: int | None = None,
) -> Mesh:
  """A (`data`, `model`) mesh over `devices` (default: the first `num_devices` of jax.devices()).

  Axes are Auto, not jax.make_mesh's default Explicit: models only name logical axes and bind no
  mesh, so with Explicit axes every einsum contracting a sharded dimension would need an
  `out_sharding` in model code (ShardingTypeError otherwise). With Auto, shardings are fixed at
  the jit boundary (placed params, in/out shardings) and XLA propagates them inside.
  """
  shape = mesh_shape(strategy, num_devices, data=data)
  if devices is None:
    available = jax.devices()
    if len(available) < num_devices:
      raise ValueError(
          f"{strategy!r} needs {num_devices} devices but only {len(available)} are visible"
          " (on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
    devices = available[:num_devices]
  devices = list(devices)
  if len(devices) != num_devices:
    raise ValueError(f"got {len(devices)} devices for num_devices={num_devices}")
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:  # topology-aware device order on TPU/GPU
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
  except (ValueError, NotImplementedError) as e:  # an odd subset of a TPU slice, say
    logger.info("jax.make_mesh refused %s (%s); using the given device order", shape, e)
    mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)
  logger.debug("mesh for %s: %s=%d %s=%d", strategy, DATA, shape[0], MODEL, shape[1])
  return mesh


def single_device_mesh(device: jax.Device) -> Mesh:
  """A 1x1 (`data`, `model`) mesh: one replica's or one table's home."""
  return Mesh(np.asarray([device], dtype=object).reshape(1, 1), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
