"""GPU series under Triton's names, read through NVML (`pynvml` from nvidia-ml-py) at each
scrape, labelled `gpu_uuid`: `nv_gpu_utilization` (0..1), `nv_gpu_memory_total_bytes`,
`nv_gpu_memory_used_bytes` and `nv_gpu_power_usage` (watts). Where NVML cannot start (no
driver, a CPU host) the series are absent, and that is logged once at DEBUG, not per scrape.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)


def _import_pynvml() -> Any:
  import pynvml  # nvidia-ml-py

  return pynvml


class GpuCollector:
  """The GPUs NVML sees. `nvml`: the pynvml module (tests pass a fake one; default: imported
  at the first scrape). NVML starts once, at the first scrape; a failure disables the
  collector for good."""

  def __init__(self, nvml: Any = None):
    self._nvml = nvml
    self._lock = threading.Lock()
    self._state = "new"  # "new" -> "on" | "off"

  def _start(self) -> bool:
    with self._lock:
      if self._state == "new":
        try:
          self._nvml = self._nvml or _import_pynvml()
          self._nvml.nvmlInit()
          self._state = "on"
        except Exception as e:  # ImportError, NVMLError (no driver, no GPU)
          logger.debug("NVML unavailable, no nv_gpu_* metrics: %s", e)
          self._state = "off"
      return self._state == "on"

  def collect(self) -> Iterator[Metric]:
    if not self._start():
      return
    nv, labels = self._nvml, ["gpu_uuid"]
    fams = {
        "util": GaugeMetricFamily("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)",
                                  labels=labels),
        "total": GaugeMetricFamily("nv_gpu_memory_total_bytes", "GPU total memory, in bytes",
                                   labels=labels),
        "used": GaugeMetricFamily("nv_gpu_memory_used_bytes", "GPU used memory, in bytes",
                                  labels=labels),
        "power": GaugeMetricFamily("nv_gpu_power_usage", "GPU power usage in watts",
                                   labels=labels),
    }
    try:
      count = nv.nvmlDeviceGetCount()
    except Exception as e:
      logger.debug("NVML device count failed: %s", e)
      return
    for i in range(count):
      self._device(nv, i, fams)
    yield from (f for f in fams.values() if f.samples)

  @staticmethod
  def _device(nv: Any, index: int, fams: dict[str, GaugeMetricFamily]) -> None:
    """One GPU's samples; a reading the GPU does not support (power on some boards) is left
    out rather than reported as 0."""
    try:
      handle = nv.nvmlDeviceGetHandleByIndex(index)
      uuid = nv.nvmlDeviceGetUUID(handle)
      uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    except Exception as e:
      logger.debug("NVML device %d unreadable: %s", index, e)
      return
    readings = {
        "util": lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
        "total": lambda: nv.nvmlDeviceGetMemoryInfo(handle).total,
        "used": lambda: nv.nvmlDeviceGetMemoryInfo(handle).used,
        "power": lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # milliwatts
    }
    for key, read in readings.items():
      try:
        fams[key].add_metric([uuid], float(read()))
      except Exception:  # NVMLError_NotSupported and the like
        continue
