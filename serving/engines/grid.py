"""Engine for signatures with a "seq" dimension: one executable per (batch, sequence) bucket.

The bundle holds one artifact per sequence bucket (batch symbolic, see bundle/__init__.py),
or a single one with a symbolic sequence. At load every grid point is compiled and run
once, so the number of compiled shapes is len(batch buckets) x len(sequence buckets) and a
request never compiles. `dispatch` takes a batch of exactly `bucket` rows whose sequence
dimension is at most the largest bucket, and zero-pads it to the smallest sequence bucket
that fits (models mask padded positions through their `lengths` input).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest, TensorSpec
from bundle import check_seq_buckets, smallest_bucket
from serving.engines.base import Placement
from serving.engines.replica import ReplicaEngine, deserialize, resolve_signature

logger = logging.getLogger(__name__)


def seq_axes(specs: Sequence[TensorSpec]) -> dict[str, int]:
  """Tensor name -> index of its "seq" dimension, for the tensors that have one."""
  out = {}
  for t in specs:
    if t.dims.count("seq") > 1:
      raise BundleError(f"{t.name}: dims {t.dims} name 'seq' more than once")
    if "seq" in t.dims:
      out[t.name] = t.dims.index("seq")
  return out


def pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Zero-pads `x` along `axis` up to `size` (returns `x` itself when already that long)."""
  if x.shape[axis] == size:
    return x
  if x.shape[axis] > size:
    raise ValueError(f"dimension {axis} of shape {x.shape} exceeds {size}")
  out = np.zeros((*x.shape[:axis], size, *x.shape[axis + 1:]), x.dtype)
  out[(slice(None),) * axis + (slice(0, x.shape[axis]),)] = x
  return out


class SeqBundleEngine(ReplicaEngine):
  """Serves one sequence signature of a bundle on its (batch bucket x sequence bucket) grid."""

  def __init__(
      self,
      path: str | pathlib.Path,
      *,
      signature: str | None = None,
      placements: Sequence[Placement] | None = None,
      manifest: Manifest | None = None,
  ):
    self.path = pathlib.Path(path)
    self.manifest = m = manifest or bundle_lib.read_manifest(self.path)
    sig = self.signature = resolve_signature(self.path, m, signature)
    if not sig.has_seq:
      raise BundleError(f"{self.path}: signature {sig.name!r} has no 'seq' dimension; serve it"
                        " with BundleEngine")
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(m.batch_buckets)
    try:
      self.seq_buckets = check_seq_buckets(sig.seq_buckets or m.seq_buckets)
    except ValueError as e:
      raise BundleError(f"{self.path}: signature {sig.name!r}: {e}") from None
    self._in_seq = seq_axes(self.inputs)
    self._out_seq = seq_axes(self.outputs)
    self._init_replicas(placements)
    self._exported: dict[tuple[int, int], Any] = {}  # (batch, seq) -> Exported
    by_file: dict[str, Any] = {}
    for b, s in self.points():
      fname = bundle_lib.find_artifact(sig.artifacts, self._platform, batch=b, seq=s)
      if fname is None:
        raise BundleError(
            f"{self.path}: signature {sig.name!r} has no {self._platform!r} artifact for batch"
            f" {b} x sequence {s} (has {sorted(sig.artifacts)}); re-export with"
            f" ExportConfig(platforms=(..., {self._platform!r}))")
      self._exported[(b, s)] = deserialize(self.path, fname, by_file)

  @property
  def grid(self) -> tuple[tuple[int, int], ...]:
    """Every compiled (batch bucket, sequence bucket) pair."""
    return tuple((b, s) for s in self.seq_buckets for b in self.buckets)

  def points(self) -> tuple[tuple[int, int], ...]:
    return self.grid

  def batch_rows(self, point: tuple[int, int]) -> int:
    return point[0]

  def point_shape(self, t: TensorSpec, point: tuple[int, int]) -> tuple[int, ...]:
    bucket, seq = point
    return tuple(bucket if d == "batch" else seq if d == "seq" else n
                 for d, n in zip(t.dims, t.shape))

  def point_label(self, point: tuple[int, int]) -> str:
    return f"(batch {point[0]}, seq {point[1]})"

  @property
  def grid_seconds(self) -> Mapping[tuple[int, int], float]:
    """Seconds one batch takes at each (batch bucket, sequence bucket), timed at warm-up."""
    return self.point_seconds

  def seq_bucket_for(self, length: int) -> int:
    """Smallest sequence bucket holding `length` tokens."""
    bucket = smallest_bucket(self.seq_buckets, length)
    if bucket is None:
      raise ValueError(f"sequence length {length} exceeds the largest sequence bucket"
                       f" {self.seq_buckets[-1]}")
    return bucket

  def pad(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(sequence bucket, inputs zero-padded along their "seq" dimension to it)."""
    lengths = {inputs[n].shape[a] for n, a in self._in_seq.items()}
    if len(lengths) != 1:
      raise ValueError(f"inputs disagree on the sequence length: {sorted(lengths)}")
    seq = self.seq_bucket_for(lengths.pop())
    return seq, {k: pad_axis(v, self._in_seq[k], seq) if k in self._in_seq else v
                 for k, v in inputs.items()}

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    self.check_ranges(inputs)
    seq, padded = self.pad(inputs)
    replica = self._next_replica()
    return replica["compiled"][(bucket, seq)](replica["params"], padded)
