"""Which load generator drives a benchmark, per protocol, and what it sends: the C++ ones
(benchmarks/native_loadgen.cc for gRPC, native_http_loadgen.cc for HTTP) by default when they
build, else the Python one (benchmarks/loadgen.py, gRPC only)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from benchmarks.loadgen import build_request, run_load


def pick_loadgen(choice: str | None) -> tuple[str, Callable]:
  """(name, run_load) of the gRPC load generator: the C++ one by default when it builds."""
  name, runs = pick_loadgens(choice, ["grpc"])
  return name, runs["grpc"]


def pick_loadgens(choice: str | None, protocols: list[str]) -> tuple[str, dict[str, Callable]]:
  """(name, protocol -> run_load) of the load generator: the C++ ones by default when they
  build (native_loadgen.cc for gRPC, native_http_loadgen.cc for HTTP)."""
  from benchmarks import native_http_loadgen, native_loadgen

  if choice == "python":
    if "http" in protocols:
      raise SystemExit("--loadgen python speaks gRPC only: add --protocol grpc, or use the C++"
                       " load generators (the default)")
    return "python", {"grpc": run_load}
  mods = {"grpc": native_loadgen, "http": native_http_loadgen}
  why = next((w for p in protocols for b, w in [mods[p].available()] if b is None), "")
  if not why:
    return "native", {p: mods[p].run_load for p in protocols}
  if choice == "native" or "http" in protocols:
    raise SystemExit(f"the C++ load generators do not build: {why}")
  from benchmarks.serving import say  # imported here: serving imports this module
  say(f"C++ load generator unavailable, using the Python one: {why.splitlines()[0]}")
  return "python", {"grpc": run_load}


def request_for(protocol: str, model: str, inputs: dict[str, np.ndarray]) -> Any:
  """What the protocol's load generator sends for `inputs`."""
  if protocol == "http":
    from benchmarks.native_http_loadgen import http_request
    return http_request(model, inputs)
  return build_request(model, inputs)
