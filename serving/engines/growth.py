"""Growing the largest batch bucket at load where batch time is flat (accelerators).

On a GPU a small model's batch costs about the same at every bucket (one launch: the H200 ran the
demo DLRM in 0.47 ms at 1 row and at 256), so rows/s grows with the bucket and the exported
largest bucket caps the server. After warm-up has timed every bucket, the engine compiles
doublings of the largest one (or the larger fixed-batch artifacts a GPU export reserved) while
each costs at most `time_ratio` times the batch time per doubling of rows. The decisions are here,
in plain Python; the engine compiles and times.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

FLAT_BATCH_TIME = 2.0  # largest/smallest bucket batch time below which larger buckets pay
DEFAULT_TIME_RATIO = 1.5  # a doubling of rows may cost this much more batch time, at most
ACCELERATOR_MAX_ROWS = 4096  # the default growth limit on accelerators (CPU: off)


@dataclasses.dataclass(frozen=True, slots=True)
class GrowthConfig:
  """Grow the largest bucket up to `max_rows` rows while each doubling of rows costs at most
  `time_ratio` times the batch time (`time_ratio` > 1)."""

  max_rows: int
  time_ratio: float = DEFAULT_TIME_RATIO

  def __post_init__(self):
    if self.max_rows < 1 or not self.time_ratio > 1:
      raise ValueError(f"bucket growth needs max_rows >= 1 and time_ratio > 1, got"
                       f" {self.max_rows} and {self.time_ratio}")


def growth_limit(configured: int | None, platform: str) -> int:
  """Rows the largest bucket may grow to: `configured` (0: off), else 4096 on accelerators and
  off on CPU, where batch time grows with rows."""
  if configured is not None:
    return configured
  return 0 if platform == "cpu" else ACCELERATOR_MAX_ROWS


def is_flat(seconds: Mapping[int, float], ratio: float = FLAT_BATCH_TIME) -> bool:
  """Whether the largest bucket's batch time is under `ratio` times the smallest's."""
  if len(seconds) < 2:
    return False
  lo, hi = min(seconds), max(seconds)
  return seconds[lo] > 0 and seconds[hi] / seconds[lo] < ratio


def candidates(buckets: Iterable[int], max_rows: int,
               fixed: Iterable[int] | None) -> tuple[int, ...]:
  """The bucket sizes to try above the largest, smallest first: doublings up to `max_rows`
  when any batch size runs (`fixed` None), else the `fixed` artifact sizes up to it."""
  hi = max(buckets)
  if fixed is not None:
    return tuple(sorted(b for b in set(fixed) if hi < b <= max_rows))
  out, b = [], hi * 2
  while b <= max_rows:
    out.append(b)
    b *= 2
  return tuple(out)


def pays(prev_rows: int, prev_s: float, rows: int, seconds: float, time_ratio: float) -> bool:
  """Whether `rows` at `seconds` a batch is worth keeping over `prev_rows` at `prev_s`: its
  batch time grew by at most `time_ratio` per doubling of rows."""
  if prev_s <= 0:
    return False
  return seconds <= prev_s * time_ratio ** math.log2(rows / prev_rows)
