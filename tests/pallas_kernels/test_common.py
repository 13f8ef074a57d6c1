"""pallas_kernels.common: the helpers every kernel family shares, and the rule that keeps them
shared: no module in pallas_kernels/ (nor the kernel benchmark) imports another's private names."""

from __future__ import annotations

import ast
import math
import pathlib

import jax
import numpy as np
import pytest

from pallas_kernels import common

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("x,expected", [
    (1, True), (2, True), (16, True), (1024, True), (0, False), (-2, False), (3, False),
    (24, False), (48, False)])
def test_is_pow2(x, expected):
  assert common.is_pow2(x) is expected


def test_mask_value_is_finite_and_vanishes_under_softmax():
  mask = np.float32(common.MASK_VALUE)
  assert np.isfinite(mask) and mask - mask == 0  # a fully masked row never computes inf - inf
  assert np.exp(mask - np.float32(0.0)) == 0.0
  assert common.LOG2_E == pytest.approx(1 / math.log(2))


def test_device_kind_is_the_gpu_kind_or_the_wildcard(monkeypatch):
  class FakeGpu:
    device_kind = "Some GPU"

  monkeypatch.setattr(jax, "devices", lambda backend=None: [FakeGpu()])
  assert common.device_kind() == "Some GPU"

  def no_gpu(backend=None):
    raise RuntimeError(f"Unknown backend {backend}")

  monkeypatch.setattr(jax, "devices", no_gpu)
  assert common.device_kind() == common.ANY


def test_device_kind_on_this_host():
  has_gpu = jax.default_backend() == "gpu"
  assert (common.device_kind() != common.ANY) == has_gpu


def _private_imports(path: pathlib.Path) -> list[str]:
  """`from <our module> import _x` and `<our module>._x` uses in one file."""
  tree = ast.parse(path.read_text())
  found, ours = [], set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
        "pallas_kernels", "benchmarks"):
      found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
      ours |= {a.asname or a.name for a in node.names}
    elif isinstance(node, ast.Import):
      ours |= {a.asname or a.name for a in node.names if a.name.startswith("pallas_kernels")}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in ours and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      found.append(f"{node.value.id}.{node.attr}")
  return found


def test_no_private_names_cross_modules():
  files = sorted((ROOT / "pallas_kernels").glob("*.py")) + [ROOT / "benchmarks" / "kernels.py"]
  bad = {str(p.relative_to(ROOT)): names for p in files if (names := _private_imports(p))}
  assert not bad, bad
