"""Per-model batching knobs (Triton's dynamic_batching with our bucket grid and a latency
target), shared by the row batcher, the native queue and the runners."""

from __future__ import annotations

import dataclasses

from bundle import smallest_bucket

@dataclasses.dataclass(frozen=True, slots=True)
class BatchingConfig:
  """Per-model batching knobs (Triton's dynamic_batching, with our bucket grid)."""

  buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  max_queue_delay_s: float = 0.002
  dispatch_when_idle: bool = True
  max_queue_rows: int = 65536
  max_queue_requests: int | None = None  # None: bounded by rows only
  deadline_headroom: float = 0.5  # share of the time left kept for delivery and estimate error
  # Most requests (slices) in one batch; None: rows bound it only. Context models run one
  # context row per request, compiled up to their largest request bucket.
  max_batch_requests: int | None = None
  latency_slo_s: float | None = None  # the model's latency target; None: none
  max_queue_wait_s: float | None = None  # longest queue wait without a target; None: unbounded

  def __post_init__(self):
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
      raise ValueError(f"buckets must be positive and strictly increasing, got {self.buckets}")
    if self.max_queue_delay_s < 0:
      raise ValueError(f"max_queue_delay_s must be >= 0, got {self.max_queue_delay_s}")
    if self.max_queue_rows < self.buckets[-1]:
      raise ValueError(f"max_queue_rows={self.max_queue_rows} must hold one full batch"
                       f" ({self.buckets[-1]} rows)")
    if self.max_queue_requests is not None and self.max_queue_requests < 1:
      raise ValueError(f"max_queue_requests must be >= 1 (or None), got {self.max_queue_requests}")
    if self.max_batch_requests is not None and self.max_batch_requests < 1:
      raise ValueError(f"max_batch_requests must be >= 1 (or None), got"
                       f" {self.max_batch_requests}")
    if not 0.0 <= self.deadline_headroom < 1.0:
      raise ValueError(f"deadline_headroom must be in [0, 1), got {self.deadline_headroom}")
    for name in ("latency_slo_s", "max_queue_wait_s"):
      if (v := getattr(self, name)) is not None and not v > 0:
        raise ValueError(f"{name} must be > 0 (or None), got {v}")

  @property
  def queue_wait_bound_s(self) -> float | None:
    """Longest an admitted request may wait unstarted: the latency target when one is set,
    else max_queue_wait_s."""
    return self.latency_slo_s if self.latency_slo_s is not None else self.max_queue_wait_s

  @property
  def max_batch_size(self) -> int:
    return self.buckets[-1]

  def bucket_for(self, rows: int) -> int:
    """Smallest bucket holding `rows` (rows <= max_batch_size)."""
    bucket = smallest_bucket(self.buckets, rows)
    if bucket is None:
      raise ValueError(f"{rows} rows exceed the largest bucket {self.buckets[-1]}")
    return bucket


def shed_message(model: str, config: BatchingConfig) -> str:
  """What a request shed by the queue-wait bound is told (the native queue says the same)."""
  what = "latency target" if config.latency_slo_s is not None else "queue-wait bound"
  return (f"model {model}: still queued after {config.queue_wait_bound_s * 1e3:.0f} ms, its"
          f" {what}; shed unstarted: retry later or add capacity")
