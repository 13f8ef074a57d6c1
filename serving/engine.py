"""Engines execute one padded batch of a model; the runner decides what goes in it.

`Engine` is the interface the runner needs (keyword-only, numpy in, numpy out).
`BundleEngine` serves an exported bundle: it deserializes the StableHLO, restores
params (into their sharded layout when a placement is given), and compiles one
executable per bucket at load, so a request never triggers a compile.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from export import bundle as bundle_lib
from export.bundle import BundleError, Manifest, TensorSpec
from serving import codec

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class Engine(abc.ABC):
  """Runs batches of one model version; `dispatch` may return before the device finishes."""

  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  buckets: tuple[int, ...]

  @property
  def bucket_seconds(self) -> Mapping[int, float]:
    """Seconds one batch takes per bucket, timed at warm-up (may be empty): seeds the batcher's
    choice between padding a batch up and running a smaller one."""
    return {}

  max_instances: int | None = None  # most batches that may run at once; None: no limit

  @property
  def default_instances(self) -> int:
    """Batches to run at once when the model config does not say (Triton's instance_group
    count): 1, the device pipelines dispatched batches on its own."""
    return 1

  @abc.abstractmethod
  def warmup(self, *, progress: Progress | None = None) -> None:
    """Compiles (or otherwise prepares) every bucket; raises if any bucket fails."""

  @abc.abstractmethod
  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    """Starts one batch of exactly `bucket` rows; returns a handle for `fetch`."""

  @abc.abstractmethod
  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    """Waits for a dispatched batch and returns its outputs as host arrays."""

  def close(self) -> None:
    """Releases device memory held by this engine."""


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
  """Where a model version lives: its devices and how params and batches are laid out.

  `param_shardings(specs)` and `batch_sharding(ndim, bucket=)` come from `sharding/`;
  the default places everything on one device. `tables` (a `sharding.TablePlacement`, on
  `mesh`) asks for table-wise serving: see `serving.tablewise`.
  """

  devices: tuple[Any, ...]
  param_shardings: Callable[[Sequence[bundle_lib.ParamSpec]], Sequence[Any]] | None = None
  batch_sharding: Callable[..., Any] | None = None
  label: str = "single"
  tables: Any = None
  mesh: Any = None


_np_dtype = codec.spec_dtype  # kept under this name for the engines and their callers


def param_bytes(manifest: Manifest) -> int:
  """Bytes of all of a bundle's params, from its manifest (nothing restored)."""
  return sum(int(np.prod(p.shape)) * _np_dtype(p.dtype).itemsize for p in manifest.params)


def _platform() -> str:
  """The export platform artifacts are keyed by: "cpu", "cuda", "rocm" or "tpu" (never "gpu")."""
  import jax
  return jax.export.default_export_platform()


class ReplicaEngine(Engine):
  """Shared by the bundle engines: one (params, executables) replica per placement, fed in
  turn; host fetch, param accounting and release. Subclasses fill `_replicas` in warmup."""

  path: pathlib.Path
  manifest: Manifest
  placements: tuple[Placement, ...]

  def _init_replicas(self, placements: Sequence[Placement] | None) -> None:
    import jax

    self.placements = tuple(placements or (Placement(devices=(jax.devices()[0],)),))
    self._replicas: list[dict[str, Any]] = []
    self._turn = itertools.count()
    self._bucket_seconds: dict[int, float] = {}
    self._param_bytes = param_bytes(self.manifest)

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

  def _batch_sharding(self, placement: Placement, t: TensorSpec, bucket: int) -> Any:
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
  def param_bytes(self) -> int:
    return self._param_bytes

  @property
  def bucket_seconds(self) -> Mapping[int, float]:
    return dict(self._bucket_seconds)

  @property
  def ready(self) -> bool:
    return bool(self._replicas)

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in handle.items()}

  def close(self) -> None:
    for replica in self._replicas:
      for p in replica["params"]:
        p.delete()
    self._replicas.clear()


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
    import jax

    self.path = pathlib.Path(path)
    self.manifest = manifest or bundle_lib.read_manifest(self.path)
    m = self.manifest
    if m.kind != "predict":
      raise BundleError(f"{self.path}: kind {m.kind!r} is not a predict bundle")
    _check_jax_version(m, self.path)
    if signature not in m.signatures:
      raise BundleError(f"{self.path}: no signature {signature!r} (has {sorted(m.signatures)})")
    sig = m.signatures[signature]
    self.signature = sig
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(m.batch_buckets)
    if any("seq" in t.dims for t in sig.inputs):
      raise BundleError(f"{self.path}: sequence-bucketed inputs need the 2-D bucket engine")
    platform = _platform()
    files = {b: bundle_lib.find_artifact(sig.artifacts, platform, batch=b) for b in self.buckets}
    missing = [b for b, f in files.items() if f is None]
    if missing:
      raise BundleError(
          f"{self.path}: no {platform!r} artifact for buckets {missing} (has"
          f" {sorted(sig.artifacts)}); re-export with ExportConfig(platforms=(..., {platform!r}))")
    loaded: dict[str, Any] = {}
    for fname in set(files.values()):
      try:
        loaded[fname] = jax.export.deserialize(bytearray((self.path / fname).read_bytes()))
      except Exception as e:
        raise BundleError(f"{self.path / fname}: cannot deserialize StableHLO ({e})") from e
    # One Exported per bucket: a symbolic-batch artifact serves them all; GPU bundles carry
    # a fixed-batch artifact per bucket so the Triton kernels get static grids.
    self._exported = {b: loaded[f] for b, f in files.items()}
    self._init_replicas(placements)
    # Table-wise placements run the signature from looked-up embeddings (serving.tablewise).
    self._from_embeddings: dict[int, Any] = {}
    if any(p.tables is not None for p in self.placements):
      lookup = sig.table_lookup
      if lookup is None:
        raise BundleError(f"{self.path}: table-wise serving needs the signature's from-embeddings"
                          " artifact, which this bundle lacks; re-export the model")
      for b in self.buckets:
        fname = bundle_lib.find_artifact(lookup.artifacts, platform, batch=b)
        if fname is None:
          raise BundleError(f"{self.path}: no {platform!r} from-embeddings artifact for bucket {b}")
        if fname not in loaded:
          loaded[fname] = jax.export.deserialize(bytearray((self.path / fname).read_bytes()))
        self._from_embeddings[b] = loaded[fname]

  def warmup(self, *, progress: Progress | None = None) -> None:
    import jax

    say = progress or (lambda msg: None)
    for r, placement in enumerate(self.placements):
      params, shardings = self._restore(r, placement, say)
      step = lambda bucket: self._exported[bucket].call
      if placement.tables is not None:
        from serving.tablewise import TableWise

        tw = TableWise(self.signature, placement.tables, placement.mesh, str(self.path))
        params, shardings = tw.fuse(params, shardings)
        step = lambda bucket, tw=tw: tw.step(self._from_embeddings[bucket])
      compiled = {}
      for bucket in self.buckets:
        in_sharding = {t.name: self._batch_sharding(placement, t, bucket) for t in self.inputs}
        fn = jax.jit(step(bucket), in_shardings=(list(shardings), in_sharding))
        t1 = time.perf_counter()
        structs = {t.name: jax.ShapeDtypeStruct((bucket, *t.shape[1:]), _np_dtype(t.dtype))
                   for t in self.inputs}
        param_structs = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding)
                         for p in params]
        try:
          compiled[bucket] = fn.trace(param_structs, structs).lower().compile()
        except Exception as e:
          raise BundleError(f"{self.path}: compiling bucket {bucket} failed: {e}") from e
        say(f"replica {r}: bucket {bucket:>5} compiled in {time.perf_counter() - t1:.2f}s")
      # Run every bucket: surfaces runtime failures (e.g. out of memory) at load; the best of
      # the later runs, past one-off costs, times the bucket for the batcher.
      for bucket, exe in compiled.items():
        zeros = {t.name: np.zeros((bucket, *t.shape[1:]), _np_dtype(t.dtype)) for t in self.inputs}
        out = jax.block_until_ready(exe(params, zeros))
        for _ in range(2):
          t1 = time.perf_counter()
          out = jax.block_until_ready(exe(params, zeros))
          seconds = time.perf_counter() - t1
          self._bucket_seconds[bucket] = min(seconds, self._bucket_seconds.get(bucket, seconds))
        for spec in self.outputs:
          if out[spec.name].shape[0] != bucket:
            raise BundleError(f"{self.path}: output {spec.name} has {out[spec.name].shape[0]}"
                              f" rows at bucket {bucket}")
      self._replicas.append({"params": params, "compiled": compiled})

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    replica = self._next_replica()
    return replica["compiled"][bucket](replica["params"], dict(inputs))


def _check_jax_version(manifest: Manifest, path: pathlib.Path) -> None:
  """StableHLO is forward-compatible within a window; refuse bundles from a newer jax."""
  import jax

  def parse(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())

  theirs, ours = parse(manifest.jax_version), parse(jax.__version__)
  if not theirs:
    raise BundleError(f"{path}: manifest jax_version {manifest.jax_version!r} is unreadable")
  if theirs > ours:
    raise BundleError(
        f"{path}: exported with jax {manifest.jax_version}, newer than this server's jax"
        f" {jax.__version__}; upgrade the server or re-export with jax {jax.__version__}")
  if theirs[:1] != ours[:1] or (ours[1] - theirs[1] if len(theirs) > 1 else 0) > 6:
    raise BundleError(
        f"{path}: exported with jax {manifest.jax_version}, too old for jax {jax.__version__}"
        " (StableHLO compatibility window is about six months); re-export the model")
