"""benchmarks.loadgen.saturate, the saturation rule the serving benchmarks share, on rates worked
by hand (no server): a larger concurrency must beat the best by 1%, and a 5% fall stops it."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.loadgen import LoadResult, saturate


def _sweep(rates: dict[int, float]):
  ran = []

  def run(c: int) -> LoadResult:
    ran.append(c)
    return LoadResult(seconds=1.0, ok=int(rates[c]), errors={}, latencies_s=np.zeros(1),
                      rows_per_request=1)
  c, r = saturate(run, list(rates))
  return c, r.rps, ran


def test_the_first_concurrency_that_is_not_beaten_by_one_percent_wins():
  # 64 beats 32 by 20%; 128 by only 0.5% over 64, 256 is within 5% below: 64 stays, all run.
  assert _sweep({32: 1000, 64: 1200, 128: 1206, 256: 1150}) == (64, 1200, [32, 64, 128, 256])


def test_a_fall_of_more_than_five_percent_ends_the_sweep():
  assert _sweep({32: 1000, 64: 2000, 128: 1890, 256: 5000}) == (64, 2000, [32, 64, 128])


def test_a_rate_still_climbing_takes_the_largest():
  assert _sweep({16: 700, 32: 950, 64: 970}) == (64, 970, [16, 32, 64])


def test_no_concurrency_is_an_error():
  with pytest.raises(ValueError):
    saturate(lambda c: None, [])
