"""What every engine is: the `Engine` interface the runners drive, where a model version lives
(`Placement`), and the checks and sums every bundle engine shares.

`Engine` is keyword-only, numpy in and numpy out; `dispatch` may return before the device
finishes, so a runner builds batch n+1 while batch n runs.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

import bundle as bundle_lib
from bundle import BundleError, Manifest, TensorSpec, numpy_dtype
from serving.engines.memory import MemoryReport
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


class Engine(abc.ABC):
  """Runs batches of one model version; `dispatch` may return before the device finishes."""

  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  buckets: tuple[int, ...]
  seq_buckets: tuple[int, ...] = ()  # sequence buckets of a (batch x length) grid; () for rows
  # Context models (serving/engines/context.py): inputs sent once per request, and the numbers
  # of requests a batch's context part runs at (a batch holds at most the largest). () else.
  context_inputs: tuple[str, ...] = ()
  request_buckets: tuple[int, ...] = ()

  @property
  def bucket_seconds(self) -> Mapping[int, float]:
    """Seconds one batch takes per bucket, timed at warm-up (may be empty): seeds the batcher's
    choice between padding a batch up and running a smaller one."""
    return {}

  @property
  def grid_seconds(self) -> Mapping[tuple[int, int], float]:
    """Seconds per (batch bucket, sequence bucket) batch for grid engines, timed at warm-up."""
    return {}

  max_instances: int | None = None  # most batches that may run at once; None: no limit
  # Whether `dispatch` takes `rows=` (the batch's real rows; the rest is padding), which
  # runners then pass: engines whose work depends on the values (embedding caches) want it.
  wants_rows: bool = False
  # Batches one instance keeps in flight (a queued runner dispatches batch n+1 while n runs).
  pipeline_depth: int = 2

  @property
  def narrowed_inputs(self) -> Mapping[str, Any]:
    """Integer inputs the model runs narrower than they are sent (64-bit ids as 32-bit with
    JAX's x64 off): name -> the type they run as. Runners refuse a request holding a value
    outside it at admission (`check_fits`), so it never fails the batch it would share."""
    return {}

  def check_ranges(self, inputs: Mapping[str, Any]) -> None:
    """Raises INVALID_ARGUMENT when a narrowed input (`narrowed_inputs`) holds a value outside
    the type it runs as: a wrapped id would silently score another row. Runners call it at
    admission; engines call it per batch as a safety net."""
    for name, dtype in self.narrowed_inputs.items():
      x = inputs.get(name)
      if isinstance(x, np.ndarray):
        check_fits(name, x, dtype)

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

  @property
  def batch_device(self) -> Any:
    """The one device every batch input goes to, or None (several replicas or devices, or an
    engine that stages on the host): pipelines hand tensors over on the device only to this."""
    return None

  def device_outputs(self, handle: Any) -> Mapping[str, Any] | None:
    """A dispatched batch's outputs as device arrays, not waited for (None: not available)."""
    return None

  def apply_update(self, changes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Sets rows of param leaves while serving, all at once between two batches: leaf path ->
    (rows [M], values [M, *leaf.shape[1:]]). Returns the new params generation; raises
    ValueError (nothing applied) when any part is bad. Engines without params refuse."""
    raise ValueError("this model's params cannot be updated while it serves")

  def generation_of(self, handle: Any) -> int:
    """The params generation a dispatched batch runs with (0: the bundle's own params)."""
    return 0

  def memory(self) -> MemoryReport:
    """What this engine holds once warmed up (device bytes per device, host bytes). The default
    is an honest "unknown" (every number 0, `known` False) for engines that cannot tell."""
    return MemoryReport.unknown()

  def close(self) -> None:
    """Releases device memory held by this engine."""


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
  """Where a model version lives: its devices and how params and batches are laid out.

  `param_shardings(specs)` and `batch_sharding(ndim, bucket=)` come from `sharding/`;
  the default places everything on one device. `tables` (a `sharding.TablePlacement`, on
  `mesh`) asks for table-wise serving: see `serving.engines.tablewise`.
  """

  devices: tuple[Any, ...]
  param_shardings: Callable[[Sequence[bundle_lib.ParamSpec]], Sequence[Any]] | None = None
  batch_sharding: Callable[..., Any] | None = None
  label: str = "single"
  tables: Any = None
  mesh: Any = None


@functools.lru_cache(maxsize=None)
def _int_info(dtype: np.dtype) -> np.iinfo:
  return np.iinfo(dtype)  # built once per dtype: np.iinfo costs ~10 us, and batches call this


def check_fits(name: str, x: np.ndarray, dtype: Any) -> None:
  """Raises INVALID_ARGUMENT when integer input `name` holds a value integer `dtype` cannot:
  narrowed to it (64-bit ids run as 32-bit with JAX's x64 off), it would wrap into another id."""
  if not x.size:
    return
  info, lo, hi = _int_info(np.dtype(dtype)), int(x.min()), int(x.max())
  if lo < info.min or hi > info.max:
    raise ServingError(Code.INVALID_ARGUMENT, f"input {name!r} has values in [{lo}, {hi}],"
                       f" outside {np.dtype(dtype).name} [{info.min}, {info.max}] that the model"
                       " takes; send values within that range (64-bit ids: hash them into it)")


def param_bytes(manifest: Manifest) -> int:
  """Bytes of all of a bundle's params, from its manifest (nothing restored)."""
  return sum(int(np.prod(p.shape)) * numpy_dtype(p.dtype).itemsize for p in manifest.params)


def export_platform() -> str:
  """The export platform artifacts are keyed by: "cpu", "cuda", "rocm" or "tpu" (never "gpu")."""
  import jax
  return jax.export.default_export_platform()


def check_jax_version(manifest: Manifest, path: pathlib.Path) -> None:
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
