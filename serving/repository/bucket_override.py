"""The batch buckets a version compiles: the bundle's, config.json's `batch_buckets`, or an
adopted `bucket_plan: auto` plan's (`adopted_buckets`, in memory), checked against what the
bundle's artifacts can run.

A bundle exported with a symbolic batch dimension (every CPU export) runs any batch size; a GPU
export may carry one fixed-batch artifact per bucket (static grids for its kernels), and then
only those sizes exist: other buckets, and automatic plans, are refused at load with a message
saying so.
"""

from __future__ import annotations

import dataclasses

from bundle import BundleError, Manifest, artifact_key
from serving.repository.config import ModelServingConfig


def fixed_batches(manifest: Manifest, platform: str) -> frozenset[int] | None:
  """The batch sizes the bundle's `platform` artifacts are fixed to, or None when every
  signature has a symbolic-batch artifact (any size runs)."""
  allowed: frozenset[int] | None = None
  for sig in manifest.signatures.values():
    seqs = (sig.seq_buckets or manifest.seq_buckets) if sig.has_seq else (None,)
    split = sig.table_lookup.artifacts if sig.table_lookup is not None else None
    for artifacts in (sig.artifacts, split):
      for seq in seqs if artifacts is not None else ():
        if artifact_key(platform, seq) in artifacts or artifact_key(platform) in artifacts:
          continue
        sizes = frozenset(b for b in manifest.batch_buckets
                          if artifact_key(platform, seq, b) in artifacts)
        if sizes:  # none at all: no artifact for this platform, which the engine reports
          allowed = sizes if allowed is None else allowed & sizes
  return allowed


def serving_manifest(manifest: Manifest, cfg: ModelServingConfig, platform: str) -> Manifest:
  """`manifest` with the batch buckets `cfg` asks for; a BundleError when the bundle cannot
  run them, or cannot be planned automatically (fixed-batch artifacts, non-row signatures)."""
  auto, buckets = cfg.bucket_plan.auto, cfg.adopted_buckets or cfg.batch_buckets
  if buckets is None and not auto:
    return manifest
  if manifest.kind != "predict":
    raise BundleError(f"{manifest.name}: batch_buckets and bucket_plan apply to predict models,"
                      f" not to kind {manifest.kind!r}")
  fixed = fixed_batches(manifest, platform)
  if auto:
    odd = [s.name for s in manifest.signatures.values() if s.has_seq or s.context is not None]
    if odd:
      raise BundleError(f"{manifest.name}: bucket_plan auto plans the batch buckets of row"
                        f" models; signature(s) {odd} have sequence or context inputs: set"
                        " batch_buckets by hand (see `xlaserve plan-buckets`)")
    if fixed is not None:
      raise BundleError(f"{manifest.name}: bucket_plan auto needs artifacts that run any batch"
                        f" size, but this bundle's {platform!r} artifacts are compiled for"
                        f" batches {sorted(fixed)} only (a GPU export); use bucket_plan fixed,"
                        " or re-export with the buckets `xlaserve plan-buckets` prints")
  if buckets is None:
    return manifest
  if fixed is not None and (missing := sorted(set(buckets) - fixed)):
    raise BundleError(f"{manifest.name}: batch_buckets {list(buckets)} include"
                      f" {missing}, but this bundle's {platform!r} artifacts run batches"
                      f" {sorted(fixed)} only; pick among those or re-export")
  return dataclasses.replace(manifest, batch_buckets=tuple(buckets))
