"""The lock-step multi-host engine: one model on a mesh spanning every process, each batch
announced by process 0 (`LockstepEngine`) and run by every process in the same order.

Every process builds the same program (`load_everywhere`: params restored into the global mesh,
one executable per bucket, fingerprints compared so a mixed-up bundle fails everywhere). The
session around it (joining the group, choosing the bundle, the followers' loop) is
serving/multihost.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import threading
from typing import Any, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest
from serving.engines.base import (Engine, Progress, check_fits, check_jax_version, export_platform,
                                  param_bytes)
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)

DEFAULT_STRATEGY = "embedding_rows"
# One program over the whole mesh; "replicated" means independent per-device replicas.
# "embedding_tables" serves single-host only: it runs the bundle's from-embeddings artifact after
# a fused lookup (serving/engines/tablewise.py), which only BundleEngine composes; the lockstep program
# here runs the signature's own artifact, whose per-table params cannot take the fused tables.
MULTIHOST_STRATEGIES: tuple[str, ...] = ("embedding_rows", "tensor", "tensor+data")


# ---- what every process builds identically -----------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Program:
  """The bundle on the global mesh: params, one executable per bucket, and the lockstep loop."""

  loop: Any  # sharding.multihost.LockstepLoop
  params: list[Any]
  buckets: tuple[int, ...]
  names: tuple[str, ...]
  wire: tuple[np.dtype, ...]  # each input's dtype in the artifact (and across the broadcast)
  mesh_shape: dict[str, int]


def _fingerprint(path: pathlib.Path) -> np.ndarray:
  """Four int32 words naming the bundle's files and sizes: equal on every process or a mix-up."""
  h = hashlib.sha256()
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    h.update(f"{f.relative_to(path).as_posix()}:{f.stat().st_size}\n".encode())
  return np.frombuffer(h.digest()[:16], np.int32).copy()


def _prepare(path: pathlib.Path, manifest: Manifest) -> tuple[Any, np.ndarray]:
  """Local checks only (no collectives): the artifact for this platform, and the fingerprint."""
  import jax

  check_jax_version(manifest, path)
  (sig,) = manifest.signatures.values()
  platform = export_platform()
  if platform not in sig.artifacts:
    raise BundleError(f"{path}: no artifact for platform {platform!r}"
                      f" (has {sorted(sig.artifacts)})")
  if not (path / bundle_lib.PARAMS_DIR).is_dir():
    raise BundleError(f"{path / bundle_lib.PARAMS_DIR} is missing: the bundle is incomplete")
  try:
    exported = jax.export.deserialize(bytearray((path / sig.artifacts[platform]).read_bytes()))
  except Exception as e:
    raise BundleError(f"{path}: cannot deserialize StableHLO ({e})") from e
  return exported, _fingerprint(path)


def _build(path: pathlib.Path, manifest: Manifest, exported: Any, strategy: str,
           say: Progress) -> _Program:
  """Restores params straight into the global sharded layout and compiles every bucket."""
  import time

  import jax

  from sharding import ShardingPlan
  from sharding.multihost import LockstepLoop

  (sig,) = manifest.signatures.values()
  _, in_avals = jax.tree.unflatten(exported.in_tree, exported.in_avals)[0]
  names = tuple(t.name for t in sig.inputs)
  wire = tuple(np.dtype(in_avals[n].dtype) for n in names)

  plan = ShardingPlan.create(strategy, jax.device_count(), jax.devices())
  t0 = time.perf_counter()
  shardings = plan.param_shardings([p.logical_axes for p in manifest.params],
                                   [p.shape for p in manifest.params])
  params = bundle_lib.restore_params(path, manifest, shardings)  # each process: its own shards
  say(f"params restored into {strategy} mesh {dict(plan.mesh.shape)} over {jax.device_count()}"
      f" devices in {jax.process_count()} processes in {time.perf_counter() - t0:.2f}s")

  def call(params, *xs):
    return exported.call(params, dict(zip(names, xs)))

  param_structs = [jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding) for p in params]
  buckets = tuple(manifest.batch_buckets)
  specs, in_shardings, compiled = [], [], {}
  for b in buckets:
    spec = tuple(jax.ShapeDtypeStruct((b, *t.shape[1:]), dt) for t, dt in zip(sig.inputs, wire))
    in_sh = tuple(plan.input_sharding(len(t.shape), batch=b) for t in sig.inputs)
    out_sh = {t.name: plan.output_sharding(len(t.shape), batch=b) for t in sig.outputs}
    t1 = time.perf_counter()
    try:
      compiled[b] = jax.jit(call, in_shardings=(shardings, *in_sh), out_shardings=out_sh).trace(
          param_structs, *spec).lower().compile()
    except Exception as e:
      raise BundleError(f"{path}: compiling bucket {b} failed: {e}") from e
    say(f"bucket {b:>5} compiled in {time.perf_counter() - t1:.2f}s")
    specs.append(spec)
    in_shardings.append(in_sh)

  def step(params, *xs):  # every bucket is a distinct batch size: no compile at request time
    return compiled[xs[0].shape[0]](params, *xs)

  loop = LockstepLoop(step, params, specs, in_shardings)
  return _Program(loop, params, buckets, names, wire, dict(plan.mesh.shape))


def _agree(ok: bool, fingerprint: np.ndarray) -> tuple[list[int], list[int]]:
  """A collective: every process says whether its step worked; returns (failed, bundle differs)."""
  from jax.experimental import multihost_utils

  mine = np.concatenate([np.asarray([0 if ok else 1], np.int32), fingerprint.astype(np.int32)])
  table = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
  failed = [i for i in range(len(table)) if table[i, 0]]
  differ = [i for i in range(len(table)) if (table[i, 1:] != table[0, 1:]).any()]
  return failed, differ


def load_everywhere(path: pathlib.Path, manifest: Manifest, strategy: str,
                     say: Progress) -> _Program:
  """Every process loads in step: local checks, agree, restore + compile, agree.

  A process that fails a step still joins the agreement, so all of them raise together (no one
  waits alone in a collective). Restoring runs orbax's own cross-process barriers: a process
  failing inside it is caught only by those barriers' timeouts, hence the checks before it.
  """
  exported, fingerprint, error = None, np.zeros(4, np.int32), None
  try:
    exported, fingerprint = _prepare(path, manifest)
  except Exception as e:  # raised after the agreement, so the peers hear of it
    error = e
  failed, differ = _agree(error is None, fingerprint)
  if error is not None:
    raise error
  if failed:
    raise BundleError(f"process(es) {failed} cannot open {path}; see their logs")
  if differ:
    raise BundleError(f"process(es) {differ} see a different bundle at {path} than process 0"
                      " (files or sizes differ): every process must serve the same export")
  program = None
  try:
    program = _build(path, manifest, exported, strategy, say)
  except Exception as e:
    error = e
  failed, _ = _agree(error is None, fingerprint)
  if error is not None:
    raise error
  if failed:
    raise BundleError(f"process(es) {failed} failed to load {path}; see their logs")
  return program


def device_bytes_line(params: Sequence[Any], total: int) -> str:
  """This process's shards: `params bytes per local device: ID=BYTES ... (whole model N bytes)`."""
  import jax

  from sharding import per_device_bytes

  held = {d.id: n for d, n in per_device_bytes(params).items()}
  parts = " ".join(f"{k}={held[k]}" for k in sorted(held))
  return (f"process {jax.process_index()}: params bytes per local device: {parts}"
          f" (whole model {total} bytes)")


# ---- the leader -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class _Refused:
  """A batch refused before anything was broadcast (the peers never saw it)."""

  error: Exception


class LockstepEngine(Engine):
  """Leader engine: each batch runs on every process's devices, announced by `leader_step`.
  One batch at a time (`max_instances`): every process must run the same batches in order.

  `dispatch` blocks until the batch is done (the broadcast and the step are collectives). An
  input the artifact takes narrower (int64 ids as int32, since broadcasts and jitted inputs are
  32-bit without x64) is range-checked: a bad request fails alone, nothing is broadcast for it.
  """

  max_instances = 1

  def __init__(self, path: str | pathlib.Path, *, manifest: Manifest | None = None,
               strategy: str = DEFAULT_STRATEGY):
    self.path = pathlib.Path(path)
    self.manifest = manifest or bundle_lib.read_manifest(self.path)
    if len(self.manifest.signatures) != 1 or self.manifest.kind != "predict":
      raise BundleError(f"{self.path}: LockstepEngine serves predict bundles with one signature")
    (sig,) = self.manifest.signatures.values()
    self.inputs, self.outputs = sig.inputs, sig.outputs
    self.buckets = tuple(self.manifest.batch_buckets)
    self.strategy = strategy
    self._program: _Program | None = None
    self._narrowed: dict[str, np.dtype] = {}  # integer inputs the artifact takes narrower
    self._index = {b: i for i, b in enumerate(self.buckets)}
    self._lock = threading.Lock()  # one lockstep call at a time (runner, close)
    self._broken: str | None = None
    self._closed = False  # this process's shards dropped (unload): no more batches
    self._stopped = False  # the followers were released
    self.device_bytes: dict[int, int] = {}

  def warmup(self, *, progress: Progress | None = None) -> None:
    import jax

    from sharding import per_device_bytes

    say = progress or (lambda msg: None)
    program = load_everywhere(self.path, self.manifest, self.strategy, say)
    with self._lock:
      self._program = program
      self._narrowed = {t.name: dt for t, dt in zip(self.inputs, program.wire)
                        if np.issubdtype(dt, np.integer)
                        and bundle_lib.numpy_dtype(t.dtype).kind in "iu"
                        and dt.itemsize < bundle_lib.numpy_dtype(t.dtype).itemsize}
      for b in self.buckets:  # every process runs every bucket once, at load
        zeros = [np.zeros((b, *t.shape[1:]), dt) for t, dt in zip(self.inputs, program.wire)]
        out = self._step_locked(b, zeros)
        for t in self.outputs:
          if out[t.name].shape[0] != b:
            raise BundleError(f"{self.path}: output {t.name} has {out[t.name].shape[0]} rows at"
                              f" bucket {b}")
    self.device_bytes = {d.id: n for d, n in per_device_bytes(program.params).items()}
    say(device_bytes_line(program.params, self.param_bytes))
    say(f"leader of {jax.process_count()} processes: each batch is broadcast to the followers")

  @property
  def param_bytes(self) -> int:
    return param_bytes(self.manifest)  # serving.engines.base.param_bytes

  @property
  def ready(self) -> bool:
    return (self._program is not None and self._broken is None and not self._closed
            and not self._stopped)

  @property
  def narrowed_inputs(self) -> Mapping[str, Any]:
    """Integer inputs the artifact takes narrower than they are sent (known once warmed up):
    refused at admission, nothing is broadcast for them."""
    return self._narrowed

  def _host_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Inputs in the artifact's dtypes; integers narrowed only when every value fits."""
    out = []
    for t, dt in zip(self.inputs, self._program.wire):
      x = np.asarray(inputs[t.name])
      if x.dtype != dt:
        if np.issubdtype(x.dtype, np.integer) and np.issubdtype(dt, np.integer):
          check_fits(t.name, x, dt)
        x = x.astype(dt)
      out.append(x)
    return out

  def _step_locked(self, bucket: int, host: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    if self._broken is not None:
      raise RuntimeError(self._broken)
    if self._closed or self._stopped:
      raise RuntimeError(f"{self.path}: the multi-host engine was closed")
    try:
      return self._program.loop.leader_step(self._index[bucket], host)
    except Exception as e:  # the processes may be out of step now: refuse everything after
      self._broken = (f"multi-host step failed ({type(e).__name__}: {e}); the group is out of"
                      " step: the leader re-forms it")
      logger.exception("lockstep batch of bucket %d failed", bucket)
      raise

  def keepalive(self) -> str | None:
    """A no-op round trip through every process between batches (a process gone fails it
    at once); returns why the group is out of step (this or a failed batch), else None."""
    with self._lock:
      if self._broken is None and self.ready:
        try:
          self._program.loop.keepalive()
        except Exception as e:
          self._broken = f"keepalive failed ({type(e).__name__}: {e})"
          logger.error("multi-host keepalive failed: %s", e)
      return self._broken

  def dispatch(self, *, bucket: int, inputs: Mapping[str, np.ndarray]) -> Any:
    if self._program is None:
      raise RuntimeError(f"{self.path}: warmup() has not run")
    try:
      host = self._host_inputs(inputs)
    except ServingError as e:
      return _Refused(e)  # fetch raises it; the runner then retries each request alone
    with self._lock:
      try:
        return self._step_locked(bucket, host)
      except Exception:  # a process gone: UNAVAILABLE (retry elsewhere or later), not INTERNAL
        return _Refused(ServingError(Code.UNAVAILABLE, f"{self.path.name}: {self._broken}"))

  def fetch(self, handle: Any) -> dict[str, np.ndarray]:
    if isinstance(handle, _Refused):
      raise handle.error
    return handle

  def close(self) -> None:
    """Drops this process's shards. The followers stay parked in their loop (so an unload does
    not end the group) until `stop_followers`, which the leader calls on its way out."""
    with self._lock:
      if self._program is None or self._closed:
        return
      self._closed = True
      for p in self._program.params:
        p.delete()

  def stop_followers(self) -> None:
    """Releases the followers: their loops return and they leave the process group."""
    with self._lock:
      if self._program is None or self._stopped or self._broken is not None:
        return
      self._stopped = True
      try:
        self._program.loop.stop()
      except Exception:
        logger.exception("could not tell the followers to stop")


