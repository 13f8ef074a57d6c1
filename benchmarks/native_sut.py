"""benchmarks/native_sut.cc, LoadGen's gRPC system under test as a CPython extension, built on
demand with g++ (beside the C++ load generators in bench_out/native_loadgen/) and imported from
there; `available()` says whether that worked and, if not, why."""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from types import ModuleType

from benchmarks.native_loadgen import BINARY, COMMON, GRPC_COMMON, compile_cc, fresh, grpc_flags

SOURCE = COMMON.with_name("native_sut.cc")
LIBRARY = BINARY.with_name("_native_sut" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def build(force: bool = False) -> ModuleType:
  """Compiles the extension if missing or stale and imports it (once per process: a loaded
  extension cannot be replaced). Raises RuntimeError saying why it did not build."""
  if not force and (loaded := sys.modules.get("_native_sut")) is not None:
    return loaded  # no file checks or rebuild: what is loaded stays loaded
  headers = (COMMON, GRPC_COMMON)
  if force or not fresh(LIBRARY, [SOURCE, *headers]):
    include = sysconfig.get_paths()["include"]
    compile_cc(SOURCE, LIBRARY, ["-shared", "-fPIC", f"-I{include}", *grpc_flags()], force=True,
               headers=headers)
  if (loaded := sys.modules.get("_native_sut")) is not None:
    return loaded
  spec = importlib.util.spec_from_file_location("_native_sut", LIBRARY)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except ImportError as e:
    raise RuntimeError(f"{LIBRARY} does not load: {e}") from e
  sys.modules["_native_sut"] = module
  return module


def available() -> tuple[ModuleType | None, str]:
  """(module, "") when the extension builds and loads, else (None, why)."""
  try:
    return build(), ""
  except RuntimeError as e:
    return None, str(e)
