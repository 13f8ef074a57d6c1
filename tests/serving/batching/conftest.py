"""Both implementations of the row-batching decisions, for tests that must hold for each: the
Python Batcher and the native queue's C++ Decider (skipped where the extension is not built)."""

import pytest

from serving.batching import Batcher, BatchingConfig
from serving.frontend.native import load_extension
from serving.frontend.native_queue import NativeBatcher

_native, _why = load_extension()


@pytest.fixture(params=["python", pytest.param(
    "native", marks=pytest.mark.skipif(_native is None, reason=_why))])
def make_batcher(request):
  """`make_batcher(executors=1, **BatchingConfig fields)` builds a batcher of the parametrized
  implementation; `make_batcher.impl` names it."""
  def build(executors: int = 1, **kw):
    cfg = BatchingConfig(**kw)
    if request.param == "python":
      return Batcher(cfg, executors=executors)
    return NativeBatcher(cfg, _native, executors=executors)
  build.impl = request.param
  return build
