"""The shared body of the bundle engines: one (params, executables) replica per placement and
one warm-up loop over every compiled point.

A point is one compiled shape: a batch bucket for row models (`BundleEngine`), a (batch bucket,
sequence bucket) pair for sequence models (`SeqBundleEngine`). Warm-up restores params into the
placement's layout, compiles every point, runs each once (runtime failures such as out of
memory surface at load) and times it as the best of two more runs, so the batcher starts with
a measured batch time for every point. The number of compiled shapes equals the number of
points: a request never compiles.
"""

from __future__ import annotations

import itertools
import os
import threading
import pathlib
import time
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest, Signature, TensorSpec, numpy_dtype
from serving.engines.base import (Engine, Placement, Progress, check_jax_version,
                                  export_platform, param_bytes)
from serving.engines.memory import MemoryReport, merge, replica_memory

Point = Hashable
Step = Callable[[Point], Callable[..., Any]]


def narrowed_inputs(inputs: Sequence[TensorSpec]) -> dict[str, type]:
  """64-bit integer inputs jit takes as 32-bit while JAX's x64 is off, with that 32-bit type."""
  import jax

  if jax.config.jax_enable_x64:
    return {}
  return {t.name: np.int32 if t.dtype == "int64" else np.uint32 for t in inputs
          if t.dtype in ("int64", "uint64")}


def resolve_signature(path: pathlib.Path, manifest: Manifest, signature: str | None) -> Signature:
  """The predict signature to serve, with the checks every bundle engine makes first."""
  if manifest.kind != "predict":
    raise BundleError(f"{path}: kind {manifest.kind!r} is not a predict bundle")
  check_jax_version(manifest, path)
  if signature is None:
    if len(manifest.signatures) != 1:
      raise BundleError(f"{path}: name one of the signatures {sorted(manifest.signatures)}")
    signature = next(iter(manifest.signatures))
  if signature not in manifest.signatures:
    raise BundleError(f"{path}: no signature {signature!r} (has {sorted(manifest.signatures)})")
  return manifest.signatures[signature]


def deserialize(path: pathlib.Path, fname: str, cache: dict[str, Any]) -> Any:
  """The `jax.export.Exported` in `path/fname`, read once per file."""
  import jax

  if fname not in cache:
    try:
      cache[fname] = jax.export.deserialize(bytearray((path / fname).read_bytes()))
    except Exception as e:
      raise BundleError(f"{path / fname}: cannot deserialize StableHLO ({e})") from e
  return cache[fname]


def check_rows(path: str, spec: Any, rows: Any, values: Any,
               known: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(rows int64 [M], values) of one leaf's update, checked against its spec (None: no such
  leaf); raises ValueError saying what is wrong."""
  if spec is None:
    raise ValueError(f"no param leaf {path!r} (leaves: {list(known)})")
  rows = np.asarray(rows).reshape(-1)
  if rows.dtype.kind not in "iu":
    raise ValueError(f"{path!r}: rows must be integers, got {rows.dtype}")
  rows = rows.astype(np.int64)
  if not spec.shape or rows.size and (rows.min() < 0 or rows.max() >= spec.shape[0]):
    raise ValueError(f"rows must be in [0, {spec.shape[0] if spec.shape else 0}) for {path!r}")
  values = np.asarray(values)
  if tuple(values.shape) != (rows.size, *spec.shape[1:]):
    raise ValueError(f"{path!r}: values of shape {list(values.shape)}, expected"
                     f" {[rows.size, *spec.shape[1:]]}")
  if not rows.size:
    raise ValueError(f"{path!r}: no rows to update")
  return rows, values


class ReplicaEngine(Engine):
  """Replicas fed in turn, the shared warm-up, host fetch and release. Subclasses set
  `path`, `manifest`, `signature`, `inputs`, `outputs`, `buckets`, `_exported` (point ->
  Exported) and call `_init_replicas`; they describe points through the hooks below."""

  path: pathlib.Path
  manifest: Manifest
  signature: Signature
  placements: tuple[Placement, ...]
  _exported: dict[Point, Any]

  def _init_replicas(self, placements: Sequence[Placement] | None) -> None:
    import jax

    self.placements = tuple(placements or (Placement(devices=(jax.devices()[0],)),))
    self._replicas: list[dict[str, Any]] = []
    self._turn = itertools.count()
    self._point_seconds: dict[Point, float] = {}
    self._param_bytes = param_bytes(self.manifest)
    self._platform = export_platform()
    self._update_lock = threading.Lock()  # live row updates, one at a time
    self._generation = 0
    self._scatter_fn: Any = None
    self._memory: MemoryReport | None = None
    self._narrowed = narrowed_inputs(self.inputs)

  # -- hooks -------------------------------------------------------------------------------

  def points(self) -> tuple[Point, ...]:
    """Every compiled shape, in warm-up order."""
    return tuple(self.buckets)

  def batch_rows(self, point: Point) -> int:
    """The batch bucket of a point."""
    return point

  def point_shape(self, t: TensorSpec, point: Point) -> tuple[int, ...]:
    """The concrete shape of tensor `t` at `point`."""
    return (self.batch_rows(point), *t.shape[1:])

  def point_label(self, point: Point) -> str:
    return f"{point:>5}"

  def point_inputs(self, point: Point) -> Sequence[TensorSpec]:
    """The tensors the executable of `point` takes (engines in two parts differ per point)."""
    return self.inputs

  def point_outputs(self, point: Point) -> Sequence[TensorSpec]:
    """The tensors the executable of `point` returns."""
    return self.outputs

  def _prepare(self, placement: Placement, params: list[Any],
               shardings: list[Any]) -> tuple[list[Any], list[Any], Step]:
    """(params, shardings, point -> function) a replica compiles; table-wise serving re-lays
    the params out and composes the lookup here."""
    return params, shardings, lambda point: self._exported[point].call

  # -- warm-up -------------------------------------------------------------------------------

  def warmup(self, *, progress: Progress | None = None) -> None:
    say = progress or (lambda msg: None)
    for r, placement in enumerate(self.placements):
      params, shardings = self._restore(r, placement, say)
      params, shardings, step = self._prepare(placement, params, shardings)
      t0 = time.perf_counter()
      compiled = {p: self._compile(r, placement, params, shardings, step, p, say)
                  for p in self.points()}
      if self.seq_buckets:  # a grid says one line; row engines one per bucket (in _compile)
        say(f"replica {r}: {len(compiled)} grid points ({len(self.buckets)} batch x"
            f" {len(self.seq_buckets)} seq buckets) compiled in {time.perf_counter() - t0:.2f}s")
      for point, exe in compiled.items():
        self._run_and_time(point, exe, params)
      # step and shardings stay for buckets compiled after warm-up (BundleEngine.grow_buckets)
      self._replicas.append({"params": params, "compiled": compiled, "step": step,
                             "shardings": shardings})

  def _restore(self, r: int, placement: Placement, say: Progress) -> tuple[list[Any], list[Any]]:
    """Params restored straight into `placement`'s layout; returns (params, shardings)."""
    import jax

    specs = self.manifest.params
    t0 = time.perf_counter()
    shardings = list(placement.param_shardings(specs) if placement.param_shardings else
                     [jax.sharding.SingleDeviceSharding(placement.devices[0])] * len(specs))
    params = bundle_lib.restore_params(self.path, self.manifest, shardings)
    say(f"replica {r} ({placement.label}): params restored in {time.perf_counter() - t0:.2f}s")
    return params, shardings

  def _compile(self, r: int, placement: Placement, params: list[Any], shardings: list[Any],
               step: Step, point: Point, say: Progress) -> Any:
    import jax

    ins = self.point_inputs(point)
    in_sharding = {t.name: self.batch_sharding(placement, t, self.point_shape(t, point)[0])
                   for t in ins}
    # On accelerators the batch's device copy is donated: XLA may reuse it for outputs and
    # temporaries. Not on CPU, where an input may alias the host staging buffer it came from.
    donate = (1,) if self._platform != "cpu" else ()
    fn = jax.jit(step(point), in_shardings=(list(shardings), in_sharding), donate_argnums=donate)
    structs = {t.name: jax.ShapeDtypeStruct(self.point_shape(t, point), numpy_dtype(t.dtype))
               for t in ins}
    param_structs = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding) for p in params]
    t1 = time.perf_counter()
    try:
      exe = fn.trace(param_structs, structs).lower().compile()
    except Exception as e:
      raise BundleError(f"{self.path}: compiling bucket {self.point_label(point).strip()}"
                        f" failed: {e}") from e
    if not self.seq_buckets:
      say(f"replica {r}: bucket {self.point_label(point)} compiled in"
          f" {time.perf_counter() - t1:.2f}s")
    return exe

  def _run_and_time(self, point: Point, exe: Any, params: list[Any]) -> None:
    """Runs a point once (surfacing runtime failures at load), checks its output shapes, and
    keeps the best of two more runs as its batch time."""
    import jax

    zeros = {t.name: np.zeros(self.point_shape(t, point), numpy_dtype(t.dtype))
             for t in self.point_inputs(point)}
    out = jax.block_until_ready(exe(params, zeros))
    for t in self.point_outputs(point):
      want = self.point_shape(t, point)
      if tuple(out[t.name].shape) != want:
        raise BundleError(f"{self.path}: output {t.name} has shape {tuple(out[t.name].shape)}"
                          f" at bucket {self.point_label(point).strip()}, expected {want}")
    for _ in range(2):
      t1 = time.perf_counter()
      jax.block_until_ready(exe(params, zeros))
      seconds = time.perf_counter() - t1
      self._point_seconds[point] = min(seconds, self._point_seconds.get(point, seconds))

  # -- serving -------------------------------------------------------------------------------

  def batch_sharding(self, placement: Placement, t: TensorSpec, bucket: int) -> Any:
    """Where a batch input of `bucket` rows goes under `placement`."""
    import jax

    return (placement.batch_sharding(len(t.shape), bucket=bucket) if placement.batch_sharding
            else jax.sharding.SingleDeviceSharding(placement.devices[0]))

  def _next_replica(self) -> dict[str, Any]:
    return self._replicas[next(self._turn) % len(self._replicas)]  # atomic: instances share it

  @property
  def default_instances(self) -> int:
    """On CPU, two batches at once: XLA runs one batch on few threads, and a second one in
    parallel fills the idle cores (raw demo DLRM, 2 cores: +20-45% rows/s at every bucket).
    Accelerators pipeline dispatched batches on their own, and a placement spanning devices
    (collectives) runs one batch at a time: 1."""
    if any(len(p.devices) != 1 or p.devices[0].platform != "cpu" for p in self.placements):
      return 1
    return min(2, os.cpu_count() or 1)

  @property
  def pipeline_depth(self) -> int:
    """On CPU one batch per instance (two instances already fill the cores; a third and fourth
    batch at once only share them: demo DLRM at saturation, 2 cores: 136k rows/s at depth 1,
    121k at depth 2); on accelerators 2, so batch n+1 is dispatched while n runs."""
    return 1 if self.default_instances > 1 else 2

  @property
  def param_bytes(self) -> int:
    return self._param_bytes

  # -- live row updates ----------------------------------------------------------------------

  def apply_update(self, changes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Sets the rows of the param leaves in `changes` (path -> (rows, values)) on every
    replica, on the device, all leaves at once: a batch sees either every change or none
    (each dispatch reads its replica's params once). Returns the new params generation.
    Raises ValueError for an unknown leaf, a row out of range or a shape that does not fit."""
    import jax

    if any(p.tables is not None for p in self.placements):
      raise ValueError("live row updates are not supported under table-wise placements")
    leaves = {p.path: (i, p) for i, p in enumerate(self.manifest.params)}
    checked = {path: check_rows(path, leaves.get(path, (0, None))[1], rows, v, sorted(leaves))
               for path, (rows, v) in changes.items()}
    with self._update_lock:
      for replica in self._replicas:
        params = list(replica["params"])
        for path, (rows, v) in checked.items():
          i = leaves[path][0]
          params[i] = self._scatter(params[i], rows, np.asarray(v, params[i].dtype))
        jax.block_until_ready(params)
        replica["params"] = params  # one assignment: later batches see all of it
      self._generation += 1
      return self._generation

  @property
  def generation(self) -> int:
    """How many live row updates the params have taken."""
    return self._generation

  def _scatter(self, x: Any, rows: np.ndarray, values: np.ndarray) -> Any:
    """x with rows set; padded to a power of two (repeating the last row) so few shapes compile."""
    import jax

    if self._scatter_fn is None:
      self._scatter_fn = jax.jit(lambda a, r, v: a.at[r].set(v))
    n = 1 << max(0, len(rows) - 1).bit_length()
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], n - len(a), 0)])  # noqa: E731
    return self._scatter_fn(x, pad(rows), pad(values))

  def memory(self) -> MemoryReport:
    """Per device: the replicas' placed arrays, their executables' code and largest scratch
    (from XLA's memory analysis); host: `_host_bytes()`. Computed once, after warm-up."""
    if self._memory is None and self._replicas:
      entries = [e for i, r in enumerate(self._replicas)
                 for e in replica_memory(self._device_arrays(r), r["compiled"].values(),
                                         self._replica_devices(i))]
      self._memory = MemoryReport(devices=merge(entries), host=self._host_bytes())
    return self._memory or MemoryReport.unknown()

  def _device_arrays(self, replica: Mapping[str, Any]) -> list[Any]:
    """The device arrays a replica holds (its params; engines with more add them)."""
    return list(replica["params"])

  def _replica_devices(self, index: int) -> Sequence[Any]:
    return self.placements[index].devices if index < len(self.placements) else ()

  def _host_bytes(self) -> int:
    """Host memory the engine keeps beside its device arrays (none for bundle engines: params
    are restored straight into their device layout)."""
    return 0

  @property
  def point_seconds(self) -> Mapping[Point, float]:
    """Seconds one batch takes at each point, timed at warm-up."""
    return dict(self._point_seconds)

  @property
  def ready(self) -> bool:
    return bool(self._replicas)

  @property
  def replicas(self) -> tuple[tuple[list[Any], Mapping[Point, Any]], ...]:
    """(params, point -> compiled executable) per placement, for benchmarks and accounting."""
    return tuple((r["params"], r["compiled"]) for r in self._replicas)

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in handle.items()}

  @property
  def narrowed_inputs(self) -> Mapping[str, Any]:
    """Its 64-bit integer inputs while JAX's x64 is off (worked out once, at construction)."""
    return self._narrowed

  @property
  def batch_device(self) -> Any:
    """The device of a one-replica, one-device placement (None for any other)."""
    (p, *more) = self.placements
    if more or len(p.devices) != 1 or p.batch_sharding is not None or p.tables is not None:
      return None
    return p.devices[0]

  def device_outputs(self, handle: Any) -> Mapping[str, Any] | None:
    return dict(handle)

  def close(self) -> None:
    for replica in self._replicas:
      for p in replica["params"]:
        p.delete()
    self._replicas.clear()
