"""`BundleEngine`: serves one signature of an exported predict bundle, one executable per batch
bucket per replica, compiled at load so a request never triggers a compile.

It deserializes the StableHLO and restores params (into their sharded layout when a placement
is given); table-wise placements (`embedding_tables`) run the signature's from-embeddings
artifact after a fused lookup (serving/engines/tablewise.py).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest
from serving.engines.base import Placement
from serving.engines.replica import ReplicaEngine, Step, deserialize, resolve_signature

logger = logging.getLogger(__name__)


class BundleEngine(ReplicaEngine):
  """Serves signature `signature` of the bundle in `path`, one executable per bucket per replica."""

  def __init__(
      self,
      path: str | pathlib.Path,
      *,
      signature: str = "serve",
      placements: Sequence[Placement] | None = None,
      manifest: Manifest | None = None,
  ):
    self.path = pathlib.Path(path)
    self.manifest = manifest or bundle_lib.read_manifest(self.path)
    sig = self.signature = resolve_signature(self.path, self.manifest, signature)
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(self.manifest.batch_buckets)
    if any("seq" in t.dims for t in sig.inputs):
      raise BundleError(f"{self.path}: sequence-bucketed inputs need the 2-D bucket engine")
    self._init_replicas(placements)
    # One Exported per bucket: a symbolic-batch artifact serves them all; GPU bundles carry
    # a fixed-batch artifact per bucket so the Triton kernels get static grids.
    loaded: dict[str, Any] = {}
    self._exported = self._load_artifacts(sig.artifacts, loaded, "")
    # Table-wise placements run the signature from looked-up embeddings (serving.engines.tablewise).
    self._from_embeddings: dict[int, Any] = {}
    if any(p.tables is not None for p in self.placements):
      if sig.table_lookup is None:
        raise BundleError(f"{self.path}: table-wise serving needs the signature's from-embeddings"
                          " artifact, which this bundle lacks; re-export the model")
      self._from_embeddings = self._load_artifacts(sig.table_lookup.artifacts, loaded,
                                                   "from-embeddings ")

  def _load_artifacts(self, artifacts: Mapping[str, str], loaded: dict[str, Any],
                      what: str) -> dict[int, Any]:
    files = {b: bundle_lib.find_artifact(artifacts, self._platform, batch=b) for b in self.buckets}
    missing = [b for b, f in files.items() if f is None]
    if missing:
      raise BundleError(
          f"{self.path}: no {self._platform!r} {what}artifact for buckets {missing} (has"
          f" {sorted(artifacts)}); re-export with ExportConfig(platforms=(...,"
          f" {self._platform!r}))")
    return {b: deserialize(self.path, f, loaded) for b, f in files.items()}

  @property
  def bucket_seconds(self) -> Mapping[int, float]:
    return self.point_seconds

  def _prepare(self, placement: Placement, params: list[Any],
               shardings: list[Any]) -> tuple[list[Any], list[Any], Step]:
    if placement.tables is None:
      return super()._prepare(placement, params, shardings)
    from serving.engines.tablewise import TableWise

    tw = TableWise(self.signature, placement.tables, placement.mesh, str(self.path))
    params, shardings = tw.fuse(params, shardings)
    return params, shardings, lambda bucket: tw.step(self._from_embeddings[bucket])

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    replica = self._next_replica()
    with self._update_lock:  # the params and the generation they are, read together
      params, generation = replica["params"], self._generation
    return replica["compiled"][bucket](params, dict(inputs)), generation

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    return super().fetch(handle[0])

  def generation_of(self, handle: Any) -> int:
    return handle[1]
