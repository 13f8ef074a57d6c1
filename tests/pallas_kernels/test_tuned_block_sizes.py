"""The tuned block-size table: one home for the four kernel families, a safe fallback for each, and a
writer (`rewrite_table`) that `benchmarks/kernels.py --tune` uses and that round-trips every family."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import itertools
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import kernels as kernel_benchmark
from pallas_kernels import tuned_block_sizes as tbs
from pallas_kernels.embedding_bag import BlockSizes as BagBlockSizes
from pallas_kernels.flash_attention import BlockSizes as FlashBlockSizes
from pallas_kernels.paged_attention import BlockSizes as PagedBlockSizes
from pallas_kernels.quantized_matmul import BlockSizes as MatmulBlockSizes

FAMILIES = {
    "embedding_bag": BagBlockSizes,
    "flash_attention": FlashBlockSizes,
    "paged_attention": PagedBlockSizes,
    "quantized_matmul": MatmulBlockSizes,
}
TEST_GPU = "Test GPU 1GB"  # a device kind no table row names


def _copy_table(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / "tuned_copy.py"
  shutil.copy(tbs.__file__, path)
  return path


def _load(path: pathlib.Path, monkeypatch: pytest.MonkeyPatch):
  """Imports a copy of the table module under its own name (dataclasses look it up in sys.modules)."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, path.stem, module)
  spec.loader.exec_module(module)
  return module


def test_the_table_names_all_four_families():
  assert set(tbs.OPS) == set(FAMILIES) == {key[1] for key in tbs.TUNED_BLOCK_SIZES}
  assert set(tbs.TUNING_CANDIDATES) == set(FAMILIES)


@pytest.mark.parametrize("op", sorted(FAMILIES))
def test_the_fallback_is_the_block_sizes_defaults(op):
  """Anything unknown (device, shape class, dtype) gets the family's `BlockSizes()`."""
  entry = tbs.lookup(op, "no such shape class", "no such dtype", device_kind=TEST_GPU)
  assert FAMILIES[op](**entry) == FAMILIES[op]()
  assert entry == dict(tbs.TUNED_BLOCK_SIZES[(tbs.ANY, op, tbs.ANY, tbs.ANY)])


def test_every_row_and_candidate_is_valid_block_sizes():
  for (_, op, _, _), entry in tbs.TUNED_BLOCK_SIZES.items():
    FAMILIES[op](**entry)  # raises on a bad field or value
  for op, candidates in tbs.TUNING_CANDIDATES.items():
    assert len({tuple(sorted(c.items())) for c in candidates}) == len(candidates) > 1
    for candidate in candidates:
      FAMILIES[op](**candidate)


def test_the_table_in_the_file_is_canonical():
  """The checked-in block is exactly what the writer renders: a rewrite changes only real rows."""
  assert tbs.render_table(tbs.TUNED_BLOCK_SIZES) in pathlib.Path(tbs.__file__).read_text()


def test_writer_round_trips_all_four_families(tmp_path, monkeypatch):
  path = _copy_table(tmp_path)
  before = path.read_text()
  entries = {}
  for op, cls in FAMILIES.items():
    blocks = cls(**tbs.TUNING_CANDIDATES[op][-1])
    entries[(TEST_GPU, op, "some class", "bfloat16")] = dataclasses.asdict(blocks)
  # An existing row is overwritten, not duplicated.
  old_key = ("NVIDIA H100 80GB HBM3", "flash_attention", "s64_d64", "bfloat16")
  entries[old_key] = dataclasses.asdict(FlashBlockSizes(16, 16, 2, 1))

  assert tbs.rewrite_table(entries, path) == path
  module = _load(path, monkeypatch)
  for key, entry in entries.items():
    assert module.lookup(*key[1:], device_kind=key[0]) == entry
  assert len(module.TUNED_BLOCK_SIZES) == len(tbs.TUNED_BLOCK_SIZES) + len(FAMILIES)
  for key, entry in tbs.TUNED_BLOCK_SIZES.items():
    if key != old_key:
      assert module.TUNED_BLOCK_SIZES[key] == entry
  after = path.read_text()
  head = before.split("\n# BEGIN TUNED TABLE\n")[0]
  tail = before.split("\n# END TUNED TABLE\n")[1]
  assert after.startswith(head) and after.endswith(tail)  # only the table block changed

  tbs.rewrite_table(entries, path)  # the same winners again: byte-identical
  assert path.read_text() == after


@pytest.mark.parametrize("key,entry,match", [
    (("gpu", "flash_attention", "s64_d64"), {"block_q": 16}, "strings"),
    (("gpu", "no_such_op", "*", "*"), {"block_q": 16}, "op must be one of"),
    (("gpu", "flash_attention", "*", "*"), {"block_q": 16.0}, "ints"),
])
def test_writer_rejects_bad_entries(tmp_path, key, entry, match):
  path = _copy_table(tmp_path)
  with pytest.raises(ValueError, match=match):
    tbs.rewrite_table({key: entry}, path)
  assert path.read_text() == pathlib.Path(tbs.__file__).read_text()


def test_benchmark_tune_rewrites_all_four_families(tmp_path, monkeypatch):
  """`benchmarks/kernels.py --tune` end to end but for the GPU: its jobs cover every family, the
  fastest candidate of each wins (a failing one is skipped), and the winners land in the table."""
  jobs = kernel_benchmark.tune_jobs(False, jax.random.key(0))
  assert {job.op for job in jobs} == set(FAMILIES)
  assert all(job.block_sizes is FAMILIES[job.op] for job in jobs)
  jobs = [dataclasses.replace(job, make_args=tuple) for job in jobs]  # no arrays, no kernels run
  clock = itertools.count(10_000, -1)

  def time_ms(fn, args):  # each candidate faster than the one before; the very first one fails
    del fn, args
    ms = next(clock)
    if ms == 10_000:
      raise RuntimeError("does not compile")
    return float(ms)

  messages = []
  entries = tbs.tune(jobs, TEST_GPU, time_ms, progress=messages.append)
  assert "failed (RuntimeError)" in messages[0]
  assert len(entries) == len({(job.op, job.shape_class, job.dtype_key) for job in jobs})
  for job in jobs:
    winner = FAMILIES[job.op](**tbs.TUNING_CANDIDATES[job.op][-1])
    assert entries[(TEST_GPU, job.op, job.shape_class, job.dtype_key)] == dataclasses.asdict(winner)

  path = _copy_table(tmp_path)
  tbs.rewrite_table(entries, path)
  module = _load(path, monkeypatch)
  for (device, op, shape_class, dtype_key), entry in entries.items():
    assert module.lookup(op, shape_class, dtype_key, device_kind=device) == entry


def test_benchmark_tune_jobs_trace_with_every_candidate():
  """Every `--tune` job's inputs and every candidate trace (abstractly: no arrays, no kernel runs)."""
  for job in kernel_benchmark.tune_jobs(False, jax.random.key(0)):
    specs = jax.eval_shape(job.make_args)
    for candidate in tbs.TUNING_CANDIDATES[job.op]:
      fn = functools.partial(job.fn, block_sizes=job.block_sizes(**candidate), impl="pallas",
                             interpret=True, **job.kwargs)
      assert jax.eval_shape(fn, *specs).size > 0, (job, candidate)


def test_tune_gives_no_row_when_every_candidate_fails():
  job = tbs.TuneJob("paged_attention", "p16_d64", "int8", PagedBlockSizes, lambda: None, tuple)

  def time_ms(fn, args):
    raise ValueError("no")

  assert tbs.tune([job], TEST_GPU, time_ms, progress=lambda msg: None) == {}


def test_the_kernels_read_the_table():
  """Each family's `default_block_sizes` returns the table's row for that device and shape."""
  h100 = "NVIDIA H100 80GB HBM3"
  module = {op: importlib.import_module(f"pallas_kernels.{op}") for op in FAMILIES}
  row = lambda op, sc, dt: FAMILIES[op](**tbs.TUNED_BLOCK_SIZES[(h100, op, sc, dt)])
  assert module["flash_attention"].default_block_sizes(
      2000, 128, jnp.bfloat16, device_kind=h100) == row("flash_attention", "long_d128", "bfloat16")
  assert module["paged_attention"].default_block_sizes(
      16, 100, jnp.int8, device_kind=h100) == row("paged_attention", "p16_d128", "int8")
  assert module["quantized_matmul"].default_block_sizes(
      8, 4096, 4096, "w8a8", jnp.bfloat16, device_kind=h100) == row(
          "quantized_matmul", "decode", "w8a8:bfloat16")
  assert module["embedding_bag"].default_block_sizes(
      1024, 32, 64, jnp.float32, device_kind=h100) == row("embedding_bag", "medium", "float32")
