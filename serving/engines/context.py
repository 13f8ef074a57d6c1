"""`ContextEngine`: serves a context model (bundle `ContextSplit`) as two compiled grids.

The context part is compiled at every request bucket, the scoring part at every candidate
(batch) bucket: len(request buckets) + len(batch buckets) executables, all compiled at load. A
batch is R requests (padded to a request bucket) and C candidates (padded to a batch bucket)
with `segment` [C] naming each candidate's request. `dispatch` runs the context part, whose
features (padded to the largest request bucket, so one scoring executable serves every
request bucket) stay on the device, and the scoring part, which gathers each candidate's
feature row by its segment id before the model's scoring function.
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, ContextSplit, Manifest, TensorSpec, smallest_bucket
from serving.engines.base import Placement
from serving.engines.replica import Point, ReplicaEngine, Step, deserialize, resolve_signature

# The batch input naming each candidate row's request (row of the context part's batch).
SEGMENT_INPUT = "__segment__"
SEGMENT_SPEC = TensorSpec(SEGMENT_INPUT, "int32", (-1,), ("batch",))
CONTEXT = "context"  # context points are (CONTEXT, request bucket); scoring points are ints


class ContextEngine(ReplicaEngine):
  """Serves a context signature: a context grid over request buckets, a scoring grid over
  candidate buckets; inputs to `dispatch` are the context inputs at a request bucket,
  `SEGMENT_INPUT` and the candidate inputs at `bucket` rows."""

  def __init__(self, path: str | pathlib.Path, *, signature: str = "serve",
               placements: Sequence[Placement] | None = None, manifest: Manifest | None = None):
    self.path = pathlib.Path(path)
    self.manifest = manifest or bundle_lib.read_manifest(self.path)
    sig = self.signature = resolve_signature(self.path, self.manifest, signature)
    if sig.context is None:
      raise BundleError(f"{self.path}: signature {sig.name!r} has no context part")
    self.split: ContextSplit = sig.context
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(self.manifest.batch_buckets)
    self.request_buckets = tuple(self.split.request_buckets)
    self.context_inputs = tuple(self.split.inputs)
    if any(p.tables is not None for p in placements or ()):
      raise BundleError(f"{self.path}: table-wise serving of context models is not supported;"
                        " serve it on one device or a replicated/sharded mesh")
    self._ctx_specs = tuple(t for t in sig.inputs if t.name in self.context_inputs)
    self._cand_specs = sig.candidate_inputs
    self._score_in = (*self.split.features, SEGMENT_SPEC, *self._cand_specs)
    self._init_replicas(placements)
    loaded: dict[str, Any] = {}
    self._exported: dict[Point, Any] = {}
    for point in self.points():
      ctx = isinstance(point, tuple)
      files = self.split.artifacts if ctx else sig.artifacts
      rows = point[1] if ctx else point
      fname = bundle_lib.find_artifact(files, self._platform, batch=rows)
      if fname is None:
        raise BundleError(
            f"{self.path}: no {self._platform!r} {'context ' if ctx else ''}artifact for"
            f" {rows} {'requests' if ctx else 'candidates'} (has {sorted(files)}); re-export"
            f" with ExportConfig(platforms=(..., {self._platform!r}))")
      self._exported[point] = deserialize(self.path, fname, loaded)

  # -- the two grids as ReplicaEngine points --------------------------------------------------

  def points(self) -> tuple[Point, ...]:
    return (*((CONTEXT, r) for r in self.request_buckets), *self.buckets)

  def batch_rows(self, point: Point) -> int:
    return point[1] if isinstance(point, tuple) else point

  def point_inputs(self, point: Point) -> Sequence[TensorSpec]:
    return self._ctx_specs if isinstance(point, tuple) else self._score_in

  def point_outputs(self, point: Point) -> Sequence[TensorSpec]:
    return self.split.features if isinstance(point, tuple) else self.outputs

  def point_shape(self, t: TensorSpec, point: Point) -> tuple[int, ...]:
    # Features are padded to the largest request bucket: the scoring grid's one shape.
    rows = (self.request_buckets[-1] if t in self.split.features else self.batch_rows(point))
    return (rows, *t.shape[1:])

  def point_label(self, point: Point) -> str:
    return (f"context {point[1]:>3} requests" if isinstance(point, tuple)
            else f"{point:>5} candidates")

  def _prepare(self, placement: Placement, params: list[Any],
               shardings: list[Any]) -> tuple[list[Any], list[Any], Step]:
    import jax.numpy as jnp

    features = [t.name for t in self.split.features]
    r_max = self.request_buckets[-1]

    def step(point: Point) -> Any:
      call = self._exported[point].call
      if isinstance(point, tuple):  # features padded to r_max rows: one scoring shape
        def context(p, ins):
          out = call(p, ins)
          return {k: jnp.pad(v, [(0, r_max - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
                  for k, v in out.items()}
        return context

      def score(p, ins):
        seg = ins[SEGMENT_INPUT]
        rows = {k: jnp.take(ins[k], seg, axis=0) for k in features}
        return call(p, {**rows, **{t.name: ins[t.name] for t in self._cand_specs}})
      return score

    return params, shardings, step

  # -- serving --------------------------------------------------------------------------------

  def request_bucket_for(self, requests: int) -> int:
    """Smallest request bucket holding `requests` (at most the largest)."""
    bucket = smallest_bucket(self.request_buckets, requests)
    if bucket is None:
      raise ValueError(f"{requests} requests exceed the largest request bucket"
                       f" {self.request_buckets[-1]}")
    return bucket

  @property
  def bucket_seconds(self) -> Mapping[int, float]:
    """Per candidate bucket: its scoring time plus one smallest context batch (the batcher
    observes real batches from then on)."""
    s = self.point_seconds
    ctx = s.get((CONTEXT, self.request_buckets[0]), 0.0)
    return {b: s[b] + ctx for b in self.buckets if b in s}

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    self.check_ranges(inputs)
    replica = self._next_replica()
    ctx = {t.name: inputs[t.name] for t in self._ctx_specs}
    r = len(next(iter(ctx.values())))
    compiled, params = replica["compiled"], replica["params"]
    features = compiled[(CONTEXT, r)](params, ctx)  # stays on the device
    score_in = {SEGMENT_INPUT: inputs[SEGMENT_INPUT],
                **{t.name: inputs[t.name] for t in self._cand_specs}, **features}
    return compiled[bucket](params, score_in)
