"""What an export is asked for: the inputs of a signature and the `ExportConfig` of the bundle."""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from bundle import TensorSpec

DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True, slots=True)
class Input:
  """An input of a signature. `shape` holds ints, "batch" or "seq" (bucketed dimensions)."""

  name: str
  dtype: str
  shape: tuple[int | str, ...]

  def __post_init__(self):
    for d in self.shape:
      if isinstance(d, str) and d not in ("batch", "seq"):
        raise ValueError(f"input {self.name!r}: dimension {d!r} must be an int, 'batch' or 'seq'")
    if not self.shape or self.shape[0] != "batch":
      raise ValueError(f"input {self.name!r}: the first dimension must be 'batch', got {self.shape}")

  def to_spec(self) -> TensorSpec:
    return TensorSpec(
        self.name, str(np.dtype(jnp.dtype(self.dtype))) if self.dtype != "bfloat16" else "bfloat16",
        tuple(-1 if isinstance(d, str) else int(d) for d in self.shape),
        tuple(d if isinstance(d, str) else None for d in self.shape))


@dataclasses.dataclass(frozen=True, slots=True)
class ExportConfig:
  """What the export writes beside the computation: buckets, platforms, serving defaults.

  `seq_buckets` applies to every signature with a "seq" dimension unless
  `signature_seq_buckets` gives that signature its own. `signature_suffixes` names the
  served models of a multi-signature bundle (`<model>_<suffix>`, default the signature name).
  `request_buckets`: how many requests a context model's per-request part runs at (a batch
  holds at most the largest); its candidates run at `batch_buckets`. `deterministic`: a row's
  outputs are bit-identical whatever batch it shares (export/invariant.py), at the cost of
  running the model over `invariant_tile`-row slices. `reserve_batch_buckets`: larger batches
  a GPU export also writes fixed-batch artifacts for (CPU artifacts run any batch), which the
  server compiles only where batch time is nearly flat (serving/engines/growth.py).
  """

  batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
  seq_buckets: tuple[int, ...] = ()
  platforms: tuple[str, ...] = ("cpu",)
  quantization: str = "none"
  max_queue_delay_us: int = 2000
  signature_seq_buckets: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  signature_suffixes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # Context models (export.context): the numbers of requests their context part runs at.
  request_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
  deterministic: bool = False
  invariant_tile: int = 8
  reserve_batch_buckets: tuple[int, ...] = ()

  def __post_init__(self):
    rb = tuple(self.reserve_batch_buckets)
    if rb and (list(rb) != sorted(set(rb)) or rb[0] <= self.batch_buckets[-1]):
      raise ValueError(f"reserve_batch_buckets must be strictly increasing and above the largest"
                       f" batch bucket {self.batch_buckets[-1]}, got {rb}")
    if not self.batch_buckets or list(self.batch_buckets) != sorted(set(self.batch_buckets)):
      raise ValueError(f"batch_buckets must be strictly increasing, got {self.batch_buckets}")
    if self.batch_buckets[0] < 1:
      raise ValueError(f"batch_buckets must be positive, got {self.batch_buckets}")
    if self.invariant_tile < 1:
      raise ValueError(f"invariant_tile must be >= 1, got {self.invariant_tile}")
    rb = tuple(self.request_buckets)
    if not rb or list(rb) != sorted(set(rb)) or rb[0] < 1:
      raise ValueError(f"request_buckets must be positive and strictly increasing, got {rb}")
    per_sig = {k: tuple(v) for k, v in self.signature_seq_buckets.items()}
    for label, buckets in [("seq_buckets", tuple(self.seq_buckets))] + [
        (f"signature_seq_buckets[{k!r}]", v) for k, v in per_sig.items()]:
      if list(buckets) != sorted(set(buckets)) or (buckets and buckets[0] < 1):
        raise ValueError(f"{label} must be positive and strictly increasing, got {buckets}")
    for sig, suffix in self.signature_suffixes.items():
      if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", suffix):
        raise ValueError(f"signature_suffixes[{sig!r}]={suffix!r}: use letters, digits, '_',"
                         " '-' and '.' only")
    for p in self.platforms:
      if p not in ("cpu", "cuda", "rocm", "tpu"):
        raise ValueError(f"unknown platform {p!r}")
    object.__setattr__(self, "signature_seq_buckets", types.MappingProxyType(per_sig))
    object.__setattr__(self, "signature_suffixes",
                       types.MappingProxyType(dict(self.signature_suffixes)))

  def seq_buckets_for(self, signature: str) -> tuple[int, ...]:
    """The sequence buckets signature `signature` is exported (and served) at."""
    return tuple(self.signature_seq_buckets.get(signature, self.seq_buckets))
