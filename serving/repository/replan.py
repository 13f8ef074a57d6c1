"""`bucket_plan: auto`, the acting half: a background thread that, every `interval_s`, plans
each auto-planned version's buckets from the request sizes it recorded (auto_plan.py `decide`)
and adopts a better plan through the hot-reload path: the new buckets compile beside the
serving ones on this thread (`ModelRepository.rebuild`), the front ends switch to the new
runner, and the old one answers what it queued before it is freed. No request waits on a
compile and none fails at the switch.

The adopted buckets are an in-memory override of that version (its config's `adopted_buckets`);
config.json is never rewritten. A new version of the model, a restart, or a config.json that
changes `batch_buckets` or `bucket_plan` starts again from config.json's (or the bundle's).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any, Callable

from serving.repository.auto_plan import BucketPlanConfig, Decision, SizeTallies, decide
from serving.repository.periodic import Periodic
from serving.repository.rebuild import retire
from serving.repository.repository import ModelRepository, ServedVersion, State
from serving.runners import Runner
from serving.types import ServingError

logger = logging.getLogger(__name__)

Key = tuple[str, int]


def _fmt(buckets: tuple[int, ...]) -> str:
  return " ".join(map(str, buckets))


class AutoPlanner:
  """Re-plans and adopts bucket plans for the versions served with `bucket_plan: auto`."""

  def __init__(self, repository: ModelRepository, tallies: SizeTallies, *,
               progress: Callable[[str], None] | None = None,
               on_change: Callable[[], None] | None = None, max_wait_s: float = 1.0):
    """`tallies`: the request sizes each version recorded (the repository's observers count
    into it); `on_change`: republishes the front ends' model tables after a switch."""
    self.repo, self.tallies = repository, tallies
    self.progress = progress or (lambda msg: logger.info("%s", msg))
    self.on_change = on_change
    self.max_wait_s = max_wait_s
    self._lock = threading.Lock()
    self._due: dict[Key, float] = {}
    self._last: dict[Key, Decision] = {}
    self._failed: dict[Key, tuple[int, ...]] = {}  # a plan whose load failed is not retried
    self._adoptions: collections.Counter[str] = collections.Counter()
    self._thread = Periodic("bucket-planner", self.plan_once, self._wait_s)

  def plan_once(self, now: float | None = None) -> list[tuple[str, int, tuple[int, ...]]]:
    """Plans every auto version whose interval has passed; returns (model, version, buckets)
    of the plans adopted."""
    now = time.monotonic() if now is None else now
    adopted, live = [], set()
    for rec in self.repo.records():
      runner, plan = rec.runner, rec.config.bucket_plan
      if rec.state is not State.READY or runner is None or not plan.auto:
        continue
      key = (rec.name, rec.version)
      live.add(key)
      with self._lock:
        due = self._due.setdefault(key, now + plan.interval_s)
      if now < due:
        continue
      with self._lock:
        self._due[key] = now + plan.interval_s
      decision = self._decide(key, runner, plan)
      if decision.proposed is not None and self._adopt(rec, runner, decision):
        adopted.append((*key, decision.proposed))
    with self._lock:  # forget versions no longer served
      for table in (self._due, self._last, self._failed):
        for key in set(table) - live:
          del table[key]
    return adopted

  def _decide(self, key: Key, runner: Runner, plan: BucketPlanConfig) -> Decision:
    """The decision on the sizes recorded since the last plan (kept when too few)."""
    tally = self.tallies.of(*key)
    counts = tally.take()
    seconds = dict(getattr(getattr(runner, "engine", None), "bucket_seconds", None) or {})
    decision = decide(counts, runner.config.buckets, seconds, plan)
    if decision.current is None:  # too few requests: they count towards the next look
      tally.give_back(counts)
    elif decision.proposed is not None and self._failed.get(key) == decision.proposed:
      decision = dataclasses.replace(decision, proposed=None,
                                     reason="the best plan failed to load before")
    with self._lock:
      self._last[key] = decision
    logger.debug("%s/%s: bucket plan: %s", *key, decision.reason)
    return decision

  def _adopt(self, rec: ServedVersion, runner: Runner, d: Decision) -> bool:
    """Rebuilds `rec` with the proposed buckets beside `runner`, switches, retires `runner`."""
    label, old_buckets = f"{rec.name}/{rec.version}", tuple(runner.config.buckets)
    assert d.current is not None and d.best is not None and d.proposed is not None
    self.progress(f"{label}: adopting bucket plan {_fmt(d.proposed)} (serving {_fmt(old_buckets)}):"
                  f" {d.gain:.0%} lower expected batch cost on {d.requests} requests, padded/real"
                  f" rows {d.current.padded / d.current.real:.2f} ->"
                  f" {d.best.padded / d.best.real:.2f}; compiling beside the serving buckets")
    cfg = dataclasses.replace(rec.config, adopted_buckets=d.proposed)
    try:
      old = self.repo.rebuild(rec.name, rec.version, cfg, self.progress, expect=runner)
    except ServingError as e:  # unloaded or reloaded meanwhile
      logger.info("%s: bucket plan not adopted: %s", label, e.message)
      return False
    except Exception as e:  # the old runner keeps serving
      logger.exception("%s: loading bucket plan %s failed", label, _fmt(d.proposed))
      self.progress(f"{label}: bucket plan {_fmt(d.proposed)} failed to load ({e}); still"
                    f" serving {_fmt(old_buckets)}")
      with self._lock:
        self._failed[(rec.name, rec.version)] = d.proposed
      return False
    if self.on_change is not None:
      self.on_change()  # the front ends route to the new runner before the old one stops
    retire(old, label)
    with self._lock:
      self._adoptions[rec.name] += 1
      self._last[(rec.name, rec.version)] = dataclasses.replace(d, current=d.best)
    self.progress(f"{label}: serving buckets {_fmt(d.proposed)} (bucket plan adopted)")
    return True

  def snapshot(self) -> dict[str, Any]:
    """For metrics: adoptions per model, and per version the last plan's figures."""
    with self._lock:
      plans = {k: d for k, d in self._last.items() if d.current is not None}
      return {"adoptions": dict(self._adoptions),
              "plans": {k: {"waste": d.current.waste, "best_waste": d.best.waste,
                            "gain": d.gain, "requests": d.requests}
                        for k, d in plans.items()}}

  def _wait_s(self) -> float:
    """Until the next version is due, within [0.05, max_wait_s] seconds."""
    with self._lock:
      due = min(self._due.values(), default=None)
    if due is None:
      return self.max_wait_s
    return min(self.max_wait_s, max(0.05, due - time.monotonic()))

  def start(self) -> AutoPlanner:
    self._thread.start()
    return self

  def stop(self, timeout: float = 30.0) -> None:
    self._thread.stop(timeout)
