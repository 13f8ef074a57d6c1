"""Builds the optional native front end (serving/frontend/native/: the gRPC server in module.cc,
cq_poll.cc, wire.cc, wire_encode.cc and relay.cc, the HTTP server in http_conn.cc, http_relay.cc, http_server.cc and
http_infer.cc, the bearer token check in auth.cc, response parameters in generation.cc, the
tracing head decision in trace.cc, canary splits in split.cc, the batch queue in batcher.cc, slo.cc, row_queue.cc and row_answer.cc, the bindings, and their shared
headers) when grpc++ and RapidJSON are found; and the embedding cache's batch planner
(serving/engines/cached/plan.cc, plain C++ with pybind11) always.

Without `pkg-config --cflags --libs grpc++` and RapidJSON's headers (Debian: apt-get install
libgrpc++-dev rapidjson-dev pkg-config) the package installs without it and the server uses its
pure-Python front ends.
"""

import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_NATIVE = "serving/frontend/native"
_UNITS = ("module", "cq_poll", "wire", "wire_encode", "relay", "auth", "batcher", "slo", "row_queue", "row_answer", "http_conn",
          "http_relay", "http_server", "http_infer", "generation", "trace", "split", "tenants",
          "http_tls", "bindings")
_HEADERS = ("frontend.h", "model_table.h", "batcher.h", "row_queue.h", "http.h", "tenants.h")  # what the units share

_MISSING = ("xlaserve: building WITHOUT the native front end ({why}); the server will use the"
            " Python front ends. Install them with: apt-get install libgrpc++-dev rapidjson-dev"
            " pkg-config")


def _pkg_config(package: str, *args: str) -> list[str]:
  return subprocess.check_output(["pkg-config", *args, package], text=True,
                                 stderr=subprocess.DEVNULL).split()


def _planner(pybind11) -> Extension:
  """The embedding cache's batch planner (serving/engines/cached/plan.cc): plain C++."""
  return Extension("serving.engines.cached._plan", ["serving/engines/cached/plan.cc"],
                   include_dirs=[pybind11.get_include()], language="c++",
                   extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden"])


def _extensions() -> list[Extension]:
  import pybind11
  try:
    cflags, libs = _pkg_config("grpc++", "--cflags"), _pkg_config("grpc++", "--libs")
  except (OSError, subprocess.CalledProcessError):
    print(_MISSING.format(why="pkg-config cannot find grpc++"), file=sys.stderr)
    return [_planner(pybind11)]
  try:
    cflags += _pkg_config("RapidJSON", "--cflags")
  except (OSError, subprocess.CalledProcessError):
    print(_MISSING.format(why="pkg-config cannot find RapidJSON"), file=sys.stderr)
    return [_planner(pybind11)]
  import pybind11
  return [_planner(pybind11)] + [Extension("serving.frontend._native", [f"{_NATIVE}/{name}.cc" for name in _UNITS],
                    include_dirs=[pybind11.get_include()], depends=[f"{_NATIVE}/{h}" for h in _HEADERS],
                    language="c++",
                    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", *cflags],
                    extra_link_args=libs)]


class OptionalBuildExt(build_ext):
  """A compile failure leaves the extension out instead of failing the install."""

  def build_extension(self, ext):
    try:
      super().build_extension(ext)
    except Exception as e:  # noqa: BLE001 (any compiler or linker failure)
      if os.environ.get("XLASERVE_REQUIRE_NATIVE") == "1":
        raise
      print(_MISSING.format(why=f"compiling it failed: {e}"), file=sys.stderr)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
