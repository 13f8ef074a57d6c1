"""The server's device-memory budget (`--device-memory-budget`): a version that would take any
device past it is refused before it serves, with a message naming what holds that device.

A version is checked right after its warm-up (the compiled executables say how much code and
scratch it needs), before it turns READY, against what the versions already admitted hold,
under one lock so loads running in parallel cannot both squeeze in. A hot reload's new version
is checked beside the old one: both hold their memory until the swap. Engines that cannot tell
what they hold (`MemoryReport.known` False) are admitted and counted as 0.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from serving.engines.base import param_bytes
from serving.engines.memory import MemoryReport, runner_memory
from serving.repository.config import LoadSpec, RunnerFactory
from bundle import BundleError
from serving.types import Code

logger = logging.getLogger(__name__)


class DeviceBudgetExceeded(BundleError):
  """A load refused by the budget; explained by its message (no traceback), answered with
  RESOURCE_EXHAUSTED."""

  code = Code.RESOURCE_EXHAUSTED


def format_bytes(n: float) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1 (e.g. "1.2 GiB")."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


class DeviceBudget:
  """Bytes per device every admitted model version may take together. `guard(load)` admits
  each version its factory builds; an admitted version stops counting once `holds(label)` says
  it no longer holds memory (unloaded, retired, or failed after admission)."""

  def __init__(self, limit_bytes: int, holds: Callable[[str], bool] = lambda label: True):
    """`holds("<model>/<version>")`: whether that version still holds its memory (the
    repository: LOADING, READY or UNLOADING)."""
    if limit_bytes <= 0:
      raise ValueError(f"a device memory budget must be > 0 bytes, got {limit_bytes}")
    self.limit_bytes = limit_bytes
    self._holds = holds
    self._lock = threading.Lock()
    self._held: dict[str, MemoryReport] = {}  # "<model>/<version>" -> its report

  def guard(self, load: RunnerFactory) -> RunnerFactory:
    """`load`, with each built (warmed-up) runner admitted before it is returned; a refused
    one is closed (its memory given back) and the refusal raised."""
    def guarded(spec: LoadSpec) -> Any:
      self.precheck(spec)  # a load whose params alone cannot fit never touches the device
      runner = load(spec)
      try:
        report = self.admit(spec.name, runner)
      except BaseException:
        runner.close()
        raise
      if report.known:
        spec.progress(f"device memory within budget: {self.describe(report)}")
      return runner
    return guarded

  def describe(self, report: MemoryReport) -> str:
    """One line: bytes per device against the budget."""
    return ", ".join(f"device {d.device} {format_bytes(d.total)} of {format_bytes(self.limit_bytes)}"
                     for d in report.devices) or "no device memory"

  def admit(self, label: str, runner: Any) -> MemoryReport:
    """Records `label`'s memory, or raises DeviceBudgetExceeded saying which device
    it would overfill and which versions hold that device (nothing recorded then)."""
    report = runner_memory(runner)
    if not report.known:
      logger.info("%s: its engine does not report memory; not counted against the budget", label)
    with self._lock:
      self._held = {k: r for k, r in self._held.items() if k == label or self._holds(k)}
      for d in report.devices:
        held = {k: r.on(d.device) for k, r in self._held.items() if k != label and r.on(d.device)}
        if sum(held.values()) + d.total > self.limit_bytes:
          raise DeviceBudgetExceeded(self._refusal(label, d.device, d.total, held))
      self._held[label] = report
    return report

  def precheck(self, spec: LoadSpec) -> None:
    """Refuses, before anything is loaded, a version whose params alone (from its manifest)
    would take a device it will use past the budget beside what is held there."""
    floor = params_floor(spec)
    with self._lock:
      for device, need in floor.items():
        held = {k: r.on(device) for k, r in self._held.items()
                if k != spec.name and r.on(device) and self._holds(k)}
        if sum(held.values()) + need > self.limit_bytes:
          raise DeviceBudgetExceeded(self._refusal(spec.name, device, need, held, "at least"))

  def _refusal(self, label: str, device: int, need: int, held: dict[str, int],
               at_least: str = "") -> str:
    name, _, version = label.partition("/")
    holders = ", ".join(f"{k.replace('/', ' v')} {format_bytes(n)}"
                        for k, n in sorted(held.items(), key=lambda kv: -kv[1])) or "nothing"
    need_s = f"{at_least} {format_bytes(need)} (its params)" if at_least else format_bytes(need)
    return (f"loading {name} v{version} needs {need_s} on device {device}; budget"
            f" {format_bytes(self.limit_bytes)}; held: {holders}; unload one or raise"
            " --device-memory-budget")


def params_floor(spec: LoadSpec) -> dict[int, int]:
  """Device index -> the fewest param bytes the version will place there: its whole params on
  each device of a replicated placement, a 1/n share when a strategy shards them over n. Empty
  when it cannot tell (embedding tables cached on the host)."""
  cfg = spec.config
  if cfg.embedding_cache.device_budget_bytes is not None:
    return {}
  devices = cfg.device_ids or tuple(range(cfg.devices or 1))
  total = param_bytes(spec.manifest)
  share = total if cfg.sharding in (None, "replicated") else total // len(devices)
  return {d: share for d in devices} if share else {}


def holding(repository: Any) -> Callable[[str], bool]:
  """`holds` for a ModelRepository: a version holds memory while LOADING, READY or UNLOADING."""
  from serving.repository.repository import State

  live = (State.LOADING, State.READY, State.UNLOADING)

  def holds(label: str) -> bool:
    name, _, version = label.rpartition("/")
    return any(str(r.version) == version and r.state in live
               for r in repository.versions_of(name))
  return holds
