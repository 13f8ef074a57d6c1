"""Host metrics under Triton's names, read from /proc at each scrape: `nv_cpu_utilization`
(busy share of all cores since the previous scrape, 0..1), `nv_cpu_memory_total_bytes` and
`nv_cpu_memory_used_bytes` (MemTotal, and MemTotal - MemAvailable). On a host without /proc
(not Linux) the series are absent, never wrong. GPU series (`nv_gpu_*`) need NVML and are not
reported by this collector.
"""

from __future__ import annotations

import pathlib
import threading
from typing import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

PROC = pathlib.Path("/proc")


def cpu_times(proc: pathlib.Path = PROC) -> tuple[int, int] | None:
  """(busy, total) jiffies of all cores from /proc/stat, or None where it is missing."""
  try:
    fields = (proc / "stat").read_text().split("\n", 1)[0].split()
  except OSError:
    return None
  if not fields or fields[0] != "cpu":
    return None
  ticks = [int(v) for v in fields[1:]]
  idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
  total = sum(ticks[:8])  # guest time is already counted in user and nice
  return total - idle, total


def memory_bytes(proc: pathlib.Path = PROC) -> tuple[int, int] | None:
  """(total, used) bytes from /proc/meminfo (used: MemTotal - MemAvailable), or None."""
  try:
    lines = (proc / "meminfo").read_text().splitlines()
  except OSError:
    return None
  kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines) if v}
  if "MemTotal" not in kib or "MemAvailable" not in kib:
    return None
  return kib["MemTotal"] * 1024, (kib["MemTotal"] - kib["MemAvailable"]) * 1024


class HostCollector:
  """The host's CPU and memory series; utilization covers the time since the last scrape."""

  def __init__(self, proc: pathlib.Path = PROC):
    self._proc = proc
    self._lock = threading.Lock()
    self._last = cpu_times(proc)

  def collect(self) -> Iterator[Metric]:
    now = cpu_times(self._proc)
    if now is not None:
      with self._lock:
        last, self._last = self._last, now
      busy, total = (now[0] - last[0], now[1] - last[1]) if last else now
      util = GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")
      util.add_metric([], min(1.0, max(0.0, busy / total)) if total > 0 else 0.0)
      yield util
    mem = memory_bytes(self._proc)
    if mem is not None:
      yield GaugeMetricFamily("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes",
                              value=mem[0])
      yield GaugeMetricFamily("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes",
                              value=mem[1])
