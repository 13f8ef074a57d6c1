"""What a loaded model version holds: device bytes per device (params, compiled code, scratch)
and host bytes, computed once at load from the placed arrays and XLA's compiled memory analysis.

Params are the bytes of the arrays actually placed on each device (their shards); executable is
the generated code of every compiled point summed; scratch is the largest temporary buffer any
one point needs (XLA allocates it per run, so the largest bounds one batch). Host is what an
engine keeps in host memory beside that (an embedding cache's host tables). Engines that cannot
tell report `MemoryReport.unknown()` rather than a wrong number.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceMemory:
  """Bytes one model version holds on one device (`device`: the JAX device id)."""

  device: int
  platform: str  # "cpu", "gpu" or "tpu"
  params: int = 0
  executable: int = 0
  scratch: int = 0
  kv_cache: int = 0  # a generative engine's paged KV cache (its shard on this device)

  @property
  def total(self) -> int:
    return self.params + self.executable + self.scratch + self.kv_cache


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryReport:
  """A model version's memory: one `DeviceMemory` per device it uses, and host bytes.
  `known` is False for engines that cannot tell (then every number is 0, not an estimate)."""

  devices: tuple[DeviceMemory, ...] = ()
  host: int = 0
  known: bool = True

  @property
  def device_params(self) -> int:
    return sum(d.params for d in self.devices)

  @property
  def device_executable(self) -> int:
    return sum(d.executable for d in self.devices)

  @property
  def device_scratch(self) -> int:
    return sum(d.scratch for d in self.devices)

  @classmethod
  def unknown(cls) -> MemoryReport:
    """The report of an engine that cannot tell what it holds."""
    return cls(known=False)

  def on(self, device: int) -> int:
    """Bytes held on device `device` (0 when it uses none)."""
    return sum(d.total for d in self.devices if d.device == device)


def compiled_bytes(executables: Iterable[Any]) -> tuple[int, int]:
  """(generated code summed, largest temp) over compiled executables, from
  `memory_analysis()`; a backend that does not analyse counts 0."""
  code = temp = 0
  for exe in executables:
    try:
      m = exe.memory_analysis()
    except Exception:  # NotImplementedError, or a runtime error on some backends
      m = None
    if m is None:
      continue
    code += int(m.generated_code_size_in_bytes)
    temp = max(temp, int(m.temp_size_in_bytes))
  return code, temp


def array_bytes(arrays: Iterable[Any]) -> dict[Any, int]:
  """Bytes each device holds of placed jax.Arrays (summed over their addressable shards)."""
  held: dict[Any, int] = collections.defaultdict(int)
  for a in arrays:
    for shard in a.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return dict(held)


def replica_memory(arrays: Iterable[Any], executables: Iterable[Any],
                   devices: Sequence[Any]) -> list[DeviceMemory]:
  """One entry per device of a replica: its share of `arrays`, and the executables' code and
  scratch (a replica's compiled program runs on each of its devices)."""
  held = array_bytes(arrays)
  code, temp = compiled_bytes(executables)
  devs = list(devices) + [d for d in held if d not in devices]
  return [DeviceMemory(device=int(d.id), platform=str(d.platform), params=held.get(d, 0),
                       executable=code, scratch=temp) for d in devs]


def merge(entries: Iterable[DeviceMemory]) -> tuple[DeviceMemory, ...]:
  """Entries of the same device summed (two replicas on one device), sorted by device."""
  out: dict[int, DeviceMemory] = {}
  for e in entries:
    if e.device in out:
      o = out[e.device]
      e = DeviceMemory(e.device, e.platform, o.params + e.params, o.executable + e.executable,
                       o.scratch + e.scratch, o.kv_cache + e.kv_cache)
    out[e.device] = e
  return tuple(out[k] for k in sorted(out))


def runner_memory(runner: Any) -> MemoryReport:
  """The memory report of a runner (its own `memory()`, as generation runners have) or of its
  engine; unknown for runners without either (pipelines) or engines that cannot tell."""
  memory = getattr(runner, "memory", None) or getattr(getattr(runner, "engine", None), "memory",
                                                      None)
  if memory is None:
    return MemoryReport.unknown()
  try:
    return memory()
  except Exception:  # an engine closed under us must not break a scrape or a stats call
    logger.debug("memory report failed", exc_info=True)
    return MemoryReport.unknown()


def breakdown(report: MemoryReport) -> Mapping[str, Mapping[str, int]]:
  """kind ("params", "executable", "scratch", "kv_cache", "host") -> {device label: bytes};
  the host part is labelled "host"; "kv_cache" only where an engine holds one."""
  out: dict[str, dict[str, int]] = {"params": {}, "executable": {}, "scratch": {},
                                    "kv_cache": {}, "host": {}}
  for d in report.devices:
    for kind in ("params", "executable", "scratch") + (("kv_cache",) if d.kv_cache else ()):
      out[kind][str(d.device)] = getattr(d, kind)
  if report.host:
    out["host"]["host"] = report.host
  return out
