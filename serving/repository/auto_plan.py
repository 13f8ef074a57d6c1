"""`bucket_plan: auto`, the decision half: what a model's recorded traffic asks of its buckets.

A served version counts the rows of every request it starts (`SizeTally`, fed by the runner's
Observer through `counting`); every `interval_s` the planner (serving/repository/replan.py)
hands those counts, the version's buckets and its measured per-bucket batch seconds to `decide`,
which plans the same number of buckets (or `max_buckets`), the largest kept, with the exact
planner of serving/batching/bucket_plan.py, and adopts the plan only when it is at least
`min_gain` cheaper on that same traffic after at least `min_requests` requests. Plain Python:
no JAX, no threads of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Mapping, Sequence

from serving.batching.bucket_plan import BucketPlan, cost_model, evaluate, plan_buckets
from serving.runners import Observer

MODES = ("fixed", "auto")
COSTS = ("measured", "rows")


@dataclasses.dataclass(frozen=True, slots=True)
class BucketPlanConfig:
  """config.json `bucket_plan`: "fixed" (the bundle's or config.json's buckets, always), "auto",
  or an object with these fields."""

  mode: str = "fixed"
  interval_s: float = 300.0  # how often the recorded traffic is planned from
  min_requests: int = 1000  # requests recorded since the last plan before one is made
  min_gain: float = 0.1  # adopt only when the expected cost falls by at least this share
  max_buckets: int | None = None  # buckets the plan may compile; None: as many as today
  cost: str = "measured"  # "measured": batch seconds measured at warm-up; "rows": padded rows

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"bucket_plan mode {self.mode!r} must be one of {list(MODES)}")
    if not self.interval_s > 0:
      raise ValueError(f"bucket_plan interval_s must be > 0, got {self.interval_s}")
    if self.min_requests < 1:
      raise ValueError(f"bucket_plan min_requests must be >= 1, got {self.min_requests}")
    if not 0 <= self.min_gain < 1:
      raise ValueError(f"bucket_plan min_gain must be in [0, 1), got {self.min_gain}")
    if self.max_buckets is not None and self.max_buckets < 1:
      raise ValueError(f"bucket_plan max_buckets must be >= 1 (or null), got {self.max_buckets}")
    if self.cost not in COSTS:
      raise ValueError(f"bucket_plan cost {self.cost!r} must be one of {list(COSTS)}")

  @property
  def auto(self) -> bool:
    return self.mode == "auto"

  @classmethod
  def from_json(cls, value: Any) -> BucketPlanConfig:
    """A mode name ("fixed", "auto") or an object naming any of the fields."""
    if isinstance(value, str):
      return cls(mode=value)
    if not isinstance(value, Mapping):
      raise ValueError(f"bucket_plan must be \"fixed\", \"auto\" or an object, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(value) - known):
      raise ValueError(f"bucket_plan: unknown keys {unknown} (known: {sorted(known)})")
    d = dict(value)
    d.setdefault("mode", "auto")  # an object configures the auto mode unless it says otherwise
    for key in ("min_requests", "max_buckets"):
      v = d.get(key)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"bucket_plan {key} must be an integer, got {v!r}")
    return cls(**d)


def check_buckets(buckets: Sequence[int], what: str = "batch_buckets") -> tuple[int, ...]:
  """`buckets` as a tuple, or a ValueError unless they are integers >= 1, strictly increasing."""
  if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence) or not buckets:
    raise ValueError(f"{what} must be a non-empty list of integers, got {buckets!r}")
  if not all(isinstance(b, int) and not isinstance(b, bool) for b in buckets):
    raise ValueError(f"{what} {list(buckets)} must hold integers only")
  if buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError(f"{what} {list(buckets)} must be >= 1 and strictly increasing")
  return tuple(buckets)


class SizeTally:
  """Requests per row count, since the last `take`; thread-safe (runner threads add)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._counts: collections.Counter[int] = collections.Counter()

  def add(self, rows: Sequence[int]) -> None:
    with self._lock:
      self._counts.update(rows)

  def take(self) -> dict[int, int]:
    """The counts so far; the tally starts again from zero."""
    with self._lock:
      counts, self._counts = dict(self._counts), collections.Counter()
    return counts

  def give_back(self, counts: Mapping[int, int]) -> None:
    """Adds taken counts back (too few to plan from yet: they count towards the next look)."""
    with self._lock:
      self._counts.update(counts)


class SizeTallies:
  """One SizeTally per served (model, version), kept across the version's runners (an adopted
  plan's runner goes on counting where the old one stopped)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self._tallies: dict[tuple[str, int], SizeTally] = {}

  def of(self, name: str, version: int) -> SizeTally:
    with self._lock:
      return self._tallies.setdefault((name, version), SizeTally())

  def observing(self, inner: Callable[[str, int], Observer]) -> Callable[[str, int], Observer]:
    """An observer factory like `inner` whose observers also count request sizes here."""
    return lambda name, version: counting(inner(name, version), self.of(name, version))


def counting(inner: Observer, tally: SizeTally) -> Observer:
  """`inner` itself (made for this version alone), its `request_sizes` also counting into
  `tally`; every other hook and flag stays inner's own."""
  own = inner.request_sizes

  def request_sizes(rows: Sequence[int]) -> None:
    tally.add(rows)
    own(rows)
  inner.request_sizes = request_sizes
  return inner


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
  """What `decide` concluded: `proposed` to adopt, or None with `reason` saying why not."""

  reason: str
  requests: int = 0
  current: BucketPlan | None = None  # today's buckets on the recorded traffic
  best: BucketPlan | None = None  # the learned plan on the same traffic
  proposed: tuple[int, ...] | None = None  # set when the plan is to be adopted

  @property
  def gain(self) -> float:
    """Share of the expected cost the learned plan saves (0 without a plan)."""
    if self.current is None or self.best is None or not self.current.expected_cost:
      return 0.0
    return 1.0 - self.best.expected_cost / self.current.expected_cost


def batch_cost(seconds: Mapping[int, float], cost: str) -> Callable[[int], float]:
  """The cost of a batch of n rows: measured seconds (made non-decreasing in n, so timing noise
  cannot make a larger batch look cheaper; interpolated between buckets), or n itself."""
  if cost == "rows" or not seconds or not all(s > 0 for s in seconds.values()):
    return float
  smooth, top = {}, 0.0
  for b, s in sorted(seconds.items()):
    top = max(top, s)
    smooth[b] = top
  return cost_model(smooth)


def decide(counts: Mapping[int, int], buckets: Sequence[int], seconds: Mapping[int, float],
           config: BucketPlanConfig) -> Decision:
  """Whether `counts` (rows -> requests since the last plan) ask for other `buckets`, given the
  measured batch `seconds` per bucket; pure."""
  buckets = tuple(sorted(buckets))
  total = sum(k for n, k in counts.items() if n >= 1 and k > 0)
  if total < config.min_requests:
    return Decision(f"{total} requests recorded, fewer than min_requests"
                    f" {config.min_requests}", total)
  capped: dict[int, int] = {}  # a request over the largest bucket runs in largest-bucket slices
  for n, k in counts.items():
    if n >= 1 and k > 0:
      capped[min(n, buckets[-1])] = capped.get(min(n, buckets[-1]), 0) + k
  cost = batch_cost(seconds, config.cost)
  current = evaluate(capped, buckets, cost)
  best = plan_buckets(capped, config.max_buckets or len(buckets), largest=buckets[-1], cost=cost)
  d = Decision("", total, current, best)
  if best.buckets == buckets:
    return dataclasses.replace(d, reason="the current buckets are already the best plan")
  if best.expected_cost >= current.expected_cost:
    return dataclasses.replace(d, reason="no plan is cheaper than the current buckets")
  if d.gain < config.min_gain:
    return dataclasses.replace(d, reason=f"the best plan saves {d.gain:.1%}, under min_gain"
                               f" {config.min_gain:.0%}")
  return dataclasses.replace(d, reason=f"the best plan saves {d.gain:.1%}",
                             proposed=best.buckets)
