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
from serving.engines.base import Placement, Progress
from serving.engines.growth import GrowthConfig, candidates, pays
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

  def grow_buckets(self, growth: GrowthConfig, say: Progress) -> tuple[int, ...]:
    """After warm-up: compiles buckets above the largest, smallest first, while each pays
    (serving/engines/growth.py), on every replica; returns the buckets kept."""
    if any(p.tables is not None for p in self.placements):
      say("bucket growth: not with table-wise placements (each bucket needs its lookup split)")
      return ()
    added: list[int] = []
    for b in candidates(self.buckets, growth.max_rows, self._fixed_sizes()):
      prev = self.buckets[-1]
      try:
        exes = self._compile_extra(b, say)
      except Exception as e:  # e.g. out of device memory: serve what warm-up compiled
        say(f"bucket growth stopped at {prev} rows: bucket {b} failed ({e})")
        self._exported.pop(b, None)
        self._point_seconds.pop(b, None)
        break
      prev_s, new_s = self._point_seconds[prev], self._point_seconds[b]
      if not pays(prev, prev_s, b, new_s, growth.time_ratio):
        say(f"bucket growth stopped at {prev} rows: {b} rows take {new_s * 1e3:.3f} ms a"
            f" batch against {prev_s * 1e3:.3f} ms (more than {growth.time_ratio}x per doubling)")
        del self._exported[b], self._point_seconds[b]
        break
      for replica, exe in zip(self._replicas, exes):
        replica["compiled"][b] = exe
      self.buckets = (*self.buckets, b)
      added.append(b)
      say(f"bucket {b} added: {new_s * 1e3:.3f} ms a batch against {prev_s * 1e3:.3f} ms at"
          f" {prev} rows (batch time nearly flat)")
    return tuple(added)

  def _fixed_sizes(self) -> frozenset[int] | None:
    """The batch sizes this platform's artifacts are fixed to (a GPU export, with any reserve
    buckets), or None when a symbolic-batch artifact runs any size."""
    arts = self.signature.artifacts
    if bundle_lib.artifact_key(self._platform) in arts:
      return None
    prefix = f"{self._platform}@b"
    return frozenset(int(k[len(prefix):]) for k in arts
                     if k.startswith(prefix) and k[len(prefix):].isdigit())

  def _compile_extra(self, b: int, say: Progress) -> list[Any]:
    """Bucket `b` compiled and run on every replica (its batch time recorded)."""
    fname = bundle_lib.find_artifact(self.signature.artifacts, self._platform, batch=b)
    self._exported[b] = deserialize(self.path, fname, {})
    exes = []
    for r, (placement, replica) in enumerate(zip(self.placements, self._replicas)):
      exes.append(self._compile(r, placement, replica["params"], replica["shardings"],
                                replica["step"], b, say))
      self._run_and_time(b, exes[-1], replica["params"])
    return exes

  def _prepare(self, placement: Placement, params: list[Any],
               shardings: list[Any]) -> tuple[list[Any], list[Any], Step]:
    if placement.tables is None:
      return super()._prepare(placement, params, shardings)
    from serving.engines.tablewise import TableWise

    tw = TableWise(self.signature, placement.tables, placement.mesh, str(self.path))
    params, shardings = tw.fuse(params, shardings)
    return params, shardings, lambda bucket: tw.step(self._from_embeddings[bucket])

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    self.check_ranges(inputs)
    replica = self._next_replica()
    with self._update_lock:  # the params and the generation they are, read together
      params, generation = replica["params"], self._generation
    return replica["compiled"][bucket](params, dict(inputs)), generation

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    return super().fetch(handle[0])

  def device_outputs(self, handle: Any) -> Mapping[str, Any] | None:
    return super().device_outputs(handle[0])

  def generation_of(self, handle: Any) -> int:
    return handle[1]
