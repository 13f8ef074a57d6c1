"""Canary traffic splits and shadow versions: their config.json sections and the pure routing
decision (which served version an unversioned request goes to), testable without JAX.

A split maps each version to a weight. A request that brings the sticky parameter (e.g. a user
id) goes to the version whose interval of the cumulative weights holds a stable hash of the
key (FNV-1a with a 64-bit finalizer, not Python's salted `hash`), so one user stays on one version across requests,
processes and restarts, and moving weight between two versions moves only the users in the
shifted interval. Without the key the point is drawn at random. Versions that are not ready
are skipped and the others' weights renormalised. The shadow version is loaded but never
answers an unversioned request (see serving/frontend/shadow.py for how it is fed).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from typing import Any, Collection, Mapping, Sequence


@dataclasses.dataclass(frozen=True, slots=True)
class TrafficConfig:
  """`"traffic": {"versions": {"1": 90, "2": 10}, "sticky_parameter": "user_id"}`."""

  weights: tuple[tuple[int, float], ...]  # (version, weight), sorted by version
  sticky_parameter: str | None = None  # request parameter whose value pins a user to a version

  def __post_init__(self):
    if not self.weights:
      raise ValueError("traffic.versions must name at least one version")
    for v, w in self.weights:
      if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
        raise ValueError(f"traffic.versions: the weight of version {v} must be a finite number"
                         f" >= 0, got {w!r}")
    if not sum(w for _, w in self.weights) > 0:
      raise ValueError("traffic.versions: the weights must not all be 0")
    if self.sticky_parameter is not None and (not isinstance(self.sticky_parameter, str)
                                              or not self.sticky_parameter):
      raise ValueError("traffic.sticky_parameter must be a non-empty string (a request"
                       " parameter name, e.g. \"user_id\")")

  @property
  def versions(self) -> tuple[int, ...]:
    return tuple(v for v, _ in self.weights)

  @classmethod
  def from_json(cls, d: Any) -> TrafficConfig:
    _known(d, "traffic", {"versions", "sticky_parameter"})
    versions = d.get("versions")
    if not isinstance(versions, Mapping):
      raise ValueError("traffic.versions must be an object of version -> weight, e.g."
                       " {\"1\": 90, \"2\": 10}")
    return cls(tuple(sorted((_version(k, "traffic.versions"), w) for k, w in versions.items())),
               d.get("sticky_parameter"))


@dataclasses.dataclass(frozen=True, slots=True)
class ShadowConfig:
  """`"shadow": {"version": 3, "fraction": 0.1, "queue_requests": 64, "output": "prob"}`."""

  version: int
  fraction: float = 1.0  # share of live (unversioned) requests the shadow also scores
  queue_requests: int = 64  # shadow requests in flight at most; more are dropped and counted
  output: str | None = None  # the per-row score compared; None: the model's first output

  def __post_init__(self):
    _version(self.version, "shadow.version")
    if (not isinstance(self.fraction, (int, float)) or isinstance(self.fraction, bool)
        or not 0 <= self.fraction <= 1):
      raise ValueError(f"shadow.fraction must be in [0, 1], got {self.fraction!r}")
    if (not isinstance(self.queue_requests, int) or isinstance(self.queue_requests, bool)
        or self.queue_requests < 1):
      raise ValueError(f"shadow.queue_requests must be an integer >= 1, got"
                       f" {self.queue_requests!r}")
    if self.output is not None and (not isinstance(self.output, str) or not self.output):
      raise ValueError("shadow.output must be an output name")

  @classmethod
  def from_json(cls, d: Any) -> ShadowConfig:
    _known(d, "shadow", {"version", "fraction", "queue_requests", "output"})
    if "version" not in d:
      raise ValueError("shadow.version is required (the candidate version to score beside)")
    return cls(**{**d, "version": _version(d["version"], "shadow.version")})


def _known(d: Any, where: str, known: set[str]) -> None:
  if not isinstance(d, Mapping):
    raise ValueError(f"{where} must be an object")
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")


def _version(v: Any, where: str) -> int:
  try:
    n = int(v)
  except (TypeError, ValueError):
    n = 0
  if isinstance(v, bool) or n < 1 or str(n) != str(v).strip():
    raise ValueError(f"{where}: version {v!r} must be an integer >= 1")
  return n


def check_split(traffic: TrafficConfig | None, shadow: ShadowConfig | None,
                policy_versions: Sequence[int] = ()) -> None:
  """Cross-checks of a model's config: the shadow version is not also in the split, and (with
  a "specific" version policy, `policy_versions`) every named version is one the policy loads."""
  if traffic is not None and shadow is not None and shadow.version in traffic.versions:
    raise ValueError(f"shadow.version {shadow.version} is also in traffic.versions: a shadow"
                     " version scores beside the served ones and never answers; take it out of"
                     " the split (or drop the shadow)")
  problem = unloaded_versions(traffic, shadow, policy_versions) if policy_versions else None
  if problem:
    raise ValueError(problem)


def unloaded_versions(traffic: TrafficConfig | None, shadow: ShadowConfig | None,
                      selected: Collection[int]) -> str | None:
  """Why a split or shadow naming a version the version policy does not load is refused, or
  None when every named version is selected."""
  named = set(traffic.versions if traffic is not None else ())
  named |= {shadow.version} if shadow is not None else set()
  missing = sorted(named - set(selected))
  if not missing:
    return None
  return (f"traffic/shadow name versions {missing} that the version policy does not load (it"
          f" selects {sorted(selected)}): add them to the repository, or use version_policy"
          " \"all\" or \"specific\" with those versions")


_FNV_OFFSET, _FNV_PRIME, _MASK = 0xcbf29ce484222325, 0x100000001b3, (1 << 64) - 1


def sticky_point(key: str) -> float:
  """A stable point in [0, 1) for a request key: the same key gives the same point everywhere.
  64-bit FNV-1a of its UTF-8 bytes, then MurmurHash3's fmix64 (FNV alone mixes short keys' high
  bits poorly); the native front end computes the same (serving/frontend/native/split.cc)."""
  h = _FNV_OFFSET
  for b in key.encode("utf-8", "surrogatepass"):
    h = ((h ^ b) * _FNV_PRIME) & _MASK
  h ^= h >> 33
  h = (h * 0xff51afd7ed558ccd) & _MASK
  h ^= h >> 33
  h = (h * 0xc4ceb9fe1a85ec53) & _MASK
  h ^= h >> 33
  return (h >> 11) * 2.0 ** -53


def pick(weights: Sequence[tuple[int, float]], ready: Collection[int], u: float) -> int | None:
  """The version whose interval of the cumulative weights (ready versions with weight > 0,
  renormalised, in version order) holds `u` in [0, 1); None when none of them is ready."""
  live = [(v, w) for v, w in weights if w > 0 and v in ready]
  if not live:
    return None
  bounds, total = [], 0.0
  for _, w in live:
    total += w
    bounds.append(total)
  i = bisect.bisect_right(bounds, u * total)
  return live[min(i, len(live) - 1)][0]


class TrafficTable:
  """Each model's split and shadow as last loaded (swapped whole on a reload); thread-safe."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._table: dict[str, tuple[TrafficConfig | None, ShadowConfig | None]] = {}

  def set(self, name: str, traffic: TrafficConfig | None, shadow: ShadowConfig | None) -> None:
    with self._lock:
      table = {k: v for k, v in self._table.items() if k != name}
      if traffic is not None or shadow is not None:
        table[name] = (traffic, shadow)
      self._table = table

  def get(self, name: str) -> tuple[TrafficConfig | None, ShadowConfig | None]:
    """(split, shadow) of `name`, (None, None) for a plain model; no lock (hot path)."""
    return self._table.get(name, (None, None))

  def routed(self, name: str) -> bool:
    """Whether unversioned requests of `name` need the Python router (a split or a shadow)."""
    return name in self._table

  def is_shadow(self, name: str, version: int) -> bool:
    shadow = self._table.get(name, (None, None))[1]
    return shadow is not None and shadow.version == version
