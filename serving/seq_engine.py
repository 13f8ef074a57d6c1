"""Engine for signatures with a "seq" dimension: one executable per (batch, sequence) bucket.

The bundle holds one artifact per sequence bucket (batch symbolic, see export/bundle.py),
or a single one with a symbolic sequence. At load every grid point is compiled and run
once, so the number of compiled shapes is len(batch buckets) x len(sequence buckets) and a
request never compiles. `dispatch` takes a batch of exactly `bucket` rows whose sequence
dimension is at most the largest bucket, and zero-pads it to the smallest sequence bucket
that fits (models mask padded positions through their `lengths` input).
"""

from __future__ import annotations

import bisect
import logging
import pathlib
import time
from typing import Any, Mapping, Sequence

import numpy as np

from export import bundle as bundle_lib
from export.bundle import BundleError, Manifest, TensorSpec
from serving.engine import (Placement, Progress, ReplicaEngine, _check_jax_version, _np_dtype,
                            _platform)
from serving.seq_batching import check_seq_buckets

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
    import jax

    self.path = pathlib.Path(path)
    self.manifest = m = manifest or bundle_lib.read_manifest(self.path)
    if m.kind != "predict":
      raise BundleError(f"{self.path}: kind {m.kind!r} is not a predict bundle")
    _check_jax_version(m, self.path)
    if signature is None:
      if len(m.signatures) != 1:
        raise BundleError(f"{self.path}: name one of the signatures {sorted(m.signatures)}")
      signature = next(iter(m.signatures))
    if signature not in m.signatures:
      raise BundleError(f"{self.path}: no signature {signature!r} (has {sorted(m.signatures)})")
    sig = self.signature = m.signatures[signature]
    if not sig.has_seq:
      raise BundleError(f"{self.path}: signature {signature!r} has no 'seq' dimension; serve it"
                        " with BundleEngine")
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(m.batch_buckets)
    try:
      self.seq_buckets = check_seq_buckets(sig.seq_buckets or m.seq_buckets)
    except ValueError as e:
      raise BundleError(f"{self.path}: signature {signature!r}: {e}") from None
    self._in_seq = seq_axes(self.inputs)
    self._out_seq = seq_axes(self.outputs)
    platform = _platform()
    self._exported: dict[tuple[int, int], Any] = {}  # (batch, seq) -> Exported
    by_file: dict[str, Any] = {}
    for s in self.seq_buckets:
      for b in self.buckets:
        fname = bundle_lib.find_artifact(sig.artifacts, platform, batch=b, seq=s)
        if fname is None:
          raise BundleError(
              f"{self.path}: signature {signature!r} has no {platform!r} artifact for batch {b}"
              f" x sequence {s} (has {sorted(sig.artifacts)}); re-export with"
              f" ExportConfig(platforms=(..., {platform!r}))")
        if fname not in by_file:
          try:
            by_file[fname] = jax.export.deserialize(bytearray((self.path / fname).read_bytes()))
          except Exception as e:
            raise BundleError(f"{self.path / fname}: cannot deserialize StableHLO ({e})") from e
        self._exported[(b, s)] = by_file[fname]
    self._init_replicas(placements)

  @property
  def grid(self) -> tuple[tuple[int, int], ...]:
    """Every compiled (batch bucket, sequence bucket) pair."""
    return tuple((b, s) for s in self.seq_buckets for b in self.buckets)

  def _shape(self, t: TensorSpec, bucket: int, seq: int) -> tuple[int, ...]:
    return tuple(bucket if d == "batch" else seq if d == "seq" else n
                 for d, n in zip(t.dims, t.shape))

  def warmup(self, *, progress: Progress | None = None) -> None:
    import jax

    say = progress or (lambda msg: None)
    for r, placement in enumerate(self.placements):
      params, shardings = self._restore(r, placement, say)
      param_structs = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding)
                       for p in params]
      compiled: dict[tuple[int, int], Any] = {}
      t1 = time.perf_counter()
      for s in self.seq_buckets:
        for b in self.buckets:
          in_sharding = {t.name: self._batch_sharding(placement, t, b) for t in self.inputs}
          fn = jax.jit(self._exported[(b, s)].call, in_shardings=(list(shardings), in_sharding))
          structs = {t.name: jax.ShapeDtypeStruct(self._shape(t, b, s), _np_dtype(t.dtype))
                     for t in self.inputs}
          try:
            compiled[(b, s)] = fn.trace(param_structs, structs).lower().compile()
          except Exception as e:
            raise BundleError(f"{self.path}: compiling bucket (batch {b}, seq {s}) failed:"
                              f" {e}") from e
      say(f"replica {r}: {len(compiled)} grid points ({len(self.buckets)} batch x"
          f" {len(self.seq_buckets)} seq buckets) compiled in {time.perf_counter() - t1:.2f}s")
      # Run every grid point once: surfaces runtime failures (e.g. out of memory) at load.
      for (b, s), exe in compiled.items():
        zeros = {t.name: np.zeros(self._shape(t, b, s), _np_dtype(t.dtype)) for t in self.inputs}
        out = exe(params, zeros)
        for t in self.outputs:
          want = self._shape(t, b, s)
          if tuple(out[t.name].shape) != want:
            raise BundleError(f"{self.path}: output {t.name} has shape {out[t.name].shape} at"
                              f" (batch {b}, seq {s}), expected {want}")
        jax.block_until_ready(out)
      self._replicas.append({"params": params, "compiled": compiled})

  def seq_bucket_for(self, length: int) -> int:
    """Smallest sequence bucket holding `length` tokens."""
    i = bisect.bisect_left(self.seq_buckets, length)
    if i == len(self.seq_buckets):
      raise ValueError(f"sequence length {length} exceeds the largest sequence bucket"
                       f" {self.seq_buckets[-1]}")
    return self.seq_buckets[i]

  def pad(self, inputs: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """(sequence bucket, inputs zero-padded along their "seq" dimension to it)."""
    lengths = {inputs[n].shape[a] for n, a in self._in_seq.items()}
    if len(lengths) != 1:
      raise ValueError(f"inputs disagree on the sequence length: {sorted(lengths)}")
    seq = self.seq_bucket_for(lengths.pop())
    return seq, {k: pad_axis(v, self._in_seq[k], seq) if k in self._in_seq else v
                 for k, v in inputs.items()}

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    seq, padded = self.pad(inputs)
    replica = self._next_replica()
    return replica["compiled"][(bucket, seq)](replica["params"], padded)
