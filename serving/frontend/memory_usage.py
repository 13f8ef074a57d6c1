"""A served version's devices and memory in Triton's words: `ModelStatistics.memory_usage`
(type "GPU"/"CPU"/"TPU", id = device index, byte_size) and ModelConfig's `instance_group`
(kind and the devices of a model placed by its config.json `devices` list)."""

from __future__ import annotations

from typing import Any, Sequence

from serving.engines.memory import runner_memory
from serving.frontend.protocol import model_config_pb2 as mc

MEMORY_TYPE = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "rocm": "GPU", "tpu": "TPU"}


def add_memory_usage(stats: Any, runner: Any) -> None:
  """Appends one MemoryUsage per device the version holds memory on (params + executable +
  scratch) and one "CPU" entry (id 0) for its host-side bytes, when it has any. Engines that
  cannot tell add nothing."""
  report = runner_memory(runner)
  for d in report.devices:
    stats.memory_usage.add(type=MEMORY_TYPE.get(d.platform, d.platform.upper()), id=d.device,
                           byte_size=d.total)
  if report.host:
    stats.memory_usage.add(type="CPU", id=0, byte_size=report.host)


def add_instance_group(cfg: mc.ModelConfig, runner: Any, device_ids: Sequence[int] | None) -> None:
  """Triton's instance_group. Without a `devices` list: `count` batches at once, KIND_AUTO.
  With one: kind GPU (CPU on a CPU host), `gpus` the listed device indices and `count` per
  listed device as Triton reads it (instances = count x len(gpus))."""
  instances = runner.capabilities.instances
  if not device_ids:
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_AUTO)
    return
  platforms = {d.platform for d in runner_memory(runner).devices}
  kind = (mc.ModelInstanceGroup.KIND_CPU if platforms == {"cpu"}
          else mc.ModelInstanceGroup.KIND_GPU if platforms else mc.ModelInstanceGroup.KIND_AUTO)
  cfg.instance_group.add(count=max(1, instances // len(device_ids)), kind=kind,
                         gpus=list(device_ids))
