"""Bucket growth decisions (serving/engines/growth.py) on hand-worked timings: no JAX."""

import pytest

from serving.engines.growth import GrowthConfig, candidates, growth_limit, is_flat, pays
from serving.repository import ModelServingConfig


def test_growth_is_off_on_cpu_and_4096_rows_on_accelerators_unless_configured():
  assert growth_limit(None, "cpu") == 0
  assert growth_limit(None, "cuda") == 4096
  assert growth_limit(None, "rocm") == 4096
  assert growth_limit(1024, "cpu") == 1024
  assert growth_limit(0, "cuda") == 0


def test_flat_means_the_largest_bucket_costs_under_twice_the_smallest():
  assert is_flat({1: 0.40e-3, 64: 0.45e-3, 256: 0.47e-3})  # the H200's DLRM (docs/gpu.md)
  assert not is_flat({1: 0.06e-3, 1024: 0.30e-3})  # the light model on 2 CPU cores: 5x
  assert not is_flat({1: 0.1e-3, 8: 0.2e-3})  # exactly 2x is not flat
  assert not is_flat({8: 0.1e-3})  # one bucket says nothing


def test_candidates_double_up_to_the_limit_when_any_batch_runs():
  assert candidates((1, 8, 256), 4096, None) == (512, 1024, 2048, 4096)
  assert candidates((1, 8, 256), 3000, None) == (512, 1024, 2048)
  assert candidates((1, 8, 256), 256, None) == ()
  assert candidates((1, 2, 4), 16, None) == (8, 16)


def test_candidates_are_the_reserved_fixed_sizes_when_artifacts_fix_the_batch():
  fixed = {1, 8, 256, 512, 2048, 8192}  # a GPU export with reserve buckets 512, 2048, 8192
  assert candidates((1, 8, 256), 4096, fixed) == (512, 2048)
  assert candidates((1, 8, 256), 4096, {1, 8, 256}) == ()


@pytest.mark.parametrize("prev_rows, prev_ms, rows, ms, ratio, want", [
    (256, 0.47, 512, 0.50, 1.5, True),  # launch-bound: 6 % more time for twice the rows
    (256, 0.47, 512, 0.705, 1.5, True),  # exactly 1.5x per doubling
    (256, 0.47, 512, 0.71, 1.5, False),
    (256, 0.15, 512, 0.30, 1.5, False),  # compute-bound (CPU): time doubles with rows
    (256, 0.47, 2048, 1.5, 1.5, True),  # three doublings allow 1.5 ** 3 = 3.375x (1.586 ms)
    (256, 0.47, 2048, 1.6, 1.5, False),
    (256, 0.15, 512, 0.29, 2.0, True),  # a laxer ratio keeps it
    (256, 0.0, 512, 0.1, 1.5, False),  # an unmeasured time never pays
])
def test_a_larger_bucket_pays_while_its_time_grows_at_most_ratio_per_doubling(
    prev_rows, prev_ms, rows, ms, ratio, want):
  assert pays(prev_rows, prev_ms / 1e3, rows, ms / 1e3, ratio) is want


def test_growth_settings_are_checked():
  with pytest.raises(ValueError, match="time_ratio > 1"):
    GrowthConfig(4096, 1.0)
  with pytest.raises(ValueError, match="max_rows >= 1"):
    GrowthConfig(0)
  with pytest.raises(ValueError, match="auto_bucket_max_rows must be >= 0"):
    ModelServingConfig.from_json({"auto_bucket_max_rows": -1})
  with pytest.raises(ValueError, match="auto_bucket_time_ratio must be > 1"):
    ModelServingConfig.from_json({"auto_bucket_time_ratio": 0.9})
  assert ModelServingConfig.from_json({"auto_bucket_max_rows": 2048}).auto_bucket_max_rows == 2048
