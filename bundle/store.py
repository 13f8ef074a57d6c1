"""Bundles on disk: write (manifest last), read and validate the manifest, restore params
with orbax, list version folders."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from bundle.manifest import BundleError, Manifest, ParamSpec

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# A model folder name: the exporter writes only these, the server serves only these.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
PARAMS_DIR = "params"




def write_bundle(
    directory: str | os.PathLike[str],
    manifest: Manifest,
    params: Sequence[Any],
    artifacts: Mapping[str, bytes],
) -> pathlib.Path:
  """Writes params (orbax), artifacts and the manifest (last, so a bundle is complete when it appears)."""
  import orbax.checkpoint as ocp  # heavy; imported on use

  path = pathlib.Path(directory).absolute()
  if (path / MANIFEST).exists():
    raise BundleError(f"{path} already holds a bundle; choose another version")
  path.mkdir(parents=True, exist_ok=True)
  if len(params) != len(manifest.params):
    raise ValueError(f"{len(params)} param leaves but {len(manifest.params)} specs")
  tree = {"leaves": {f"{i:05d}": np.asarray(p) if not hasattr(p, "sharding") else p
                     for i, p in enumerate(params)}}
  if params:  # a bundle without params (a pipeline) has no checkpoint
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path / PARAMS_DIR, tree)
  for fname, blob in artifacts.items():
    (path / fname).write_bytes(blob)
  tmp = path / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest.to_json(), indent=1))
  tmp.rename(path / MANIFEST)
  logger.info("wrote bundle %s (%d params, %s)", path, len(params), sorted(artifacts))
  return path


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
  """Reads and validates `manifest.json`; raises BundleError with what to do."""
  path = pathlib.Path(directory) / MANIFEST
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise BundleError(f"no {MANIFEST} in {directory}: not an exported bundle") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BundleError(f"{path} is not valid JSON ({e}); re-export the model") from e
  try:
    return Manifest.from_json(data)
  except (KeyError, TypeError, ValueError) as e:
    raise BundleError(f"{path} is malformed ({type(e).__name__}: {e}); re-export the model") from e


def restore_params(
    directory: str | os.PathLike[str],
    manifest: Manifest,
    shardings: Sequence[Any] | None = None,
) -> list[Any]:
  """Restores the flat param leaves, straight into `shardings` when given (no host copy first)."""
  import jax
  import orbax.checkpoint as ocp

  def target(i: int, p: ParamSpec) -> jax.ShapeDtypeStruct:
    sharding = shardings[i] if shardings is not None else jax.sharding.SingleDeviceSharding(
        jax.devices()[0])
    return jax.ShapeDtypeStruct(p.shape, np.dtype(p.dtype) if p.dtype != "bfloat16"
                                else jax.numpy.bfloat16, sharding=sharding)

  if not manifest.params:
    return []
  abstract = {"leaves": {f"{i:05d}": target(i, p) for i, p in enumerate(manifest.params)}}
  ckpt = pathlib.Path(directory).absolute() / PARAMS_DIR
  if not ckpt.exists():
    raise BundleError(f"{ckpt} is missing: the bundle is incomplete; re-export the model")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(ckpt, abstract)
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise BundleError(f"cannot restore params from {ckpt}: {type(e).__name__}: {e}") from e
  return [restored["leaves"][f"{i:05d}"] for i in range(len(manifest.params))]


def list_versions(model_dir: str | os.PathLike[str]) -> list[int]:
  """Numeric version folders under `<repo>/<model>/`, ascending."""
  path = pathlib.Path(model_dir)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
