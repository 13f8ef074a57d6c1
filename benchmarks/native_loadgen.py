"""The C++ load generator (benchmarks/native_loadgen.cc), built on demand, behind loadgen's API.

`run_load` takes the same arguments as benchmarks/loadgen.py's and returns the same LoadResult,
but the sending is done by one C++ thread on a gRPC completion queue, so the generator costs a
small fraction of a core instead of most of one (which, on a 2-core machine, the server lost).
`processes` becomes the number of gRPC channels (connections), as each Python worker process
opened one. The binary is compiled into bench_out/native_loadgen/ when missing or older than
its source; `available()` says whether that worked and, if not, why.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shlex
import subprocess
import tempfile

import numpy as np

from benchmarks.loadgen import LoadResult

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).resolve().with_name("native_loadgen.cc")
COMMON = SOURCE.with_name("native_loadgen_common.h")  # shared with native_http_loadgen.cc
GRPC_COMMON = SOURCE.with_name("native_grpc_common.h")  # shared with native_sut.cc
BINARY = SOURCE.parent.parent / "bench_out" / "native_loadgen" / "native_loadgen"


def fresh(binary: pathlib.Path, inputs: list[pathlib.Path]) -> bool:
  """Whether `binary` exists and is no older than any of `inputs`."""
  return binary.exists() and binary.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def compile_cc(source: pathlib.Path, binary: pathlib.Path, flags: list[str], force: bool = False,
               headers: tuple[pathlib.Path, ...] = (COMMON,)) -> pathlib.Path:
  """Compiles `source` into `binary` with g++ -O2 (and `flags`) when missing or older than its
  source or `headers`; returns its path. Raises RuntimeError saying why it did not build."""
  if not force and fresh(binary, [source, *headers]):
    return binary
  binary.parent.mkdir(parents=True, exist_ok=True)
  tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
  cmd = ["g++", "-O2", "-std=c++17", "-pthread", str(source), *flags, "-o", str(tmp)]
  logger.info("building %s", binary)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True)
  except OSError as e:
    raise RuntimeError(f"cannot run g++: {e}") from e
  if proc.returncode != 0:
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"g++ failed:\n{proc.stderr[-4000:]}")
  tmp.replace(binary)  # atomic: a concurrent reader sees the old or the new binary
  return binary


def grpc_flags() -> list[str]:
  """g++ flags for grpc++ (pkg-config); RuntimeError saying what to install without it."""
  try:
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True,
                           text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(f"grpc++ not found by pkg-config ({e}); install libgrpc++-dev") from e
  return shlex.split(flags)


def build(force: bool = False) -> pathlib.Path:
  """Compiles the generator if missing or stale; returns its path. Raises RuntimeError on failure."""
  if not force and fresh(BINARY, [SOURCE, COMMON, GRPC_COMMON]):
    return BINARY
  return compile_cc(SOURCE, BINARY, grpc_flags(), force=True, headers=(COMMON, GRPC_COMMON))


def available() -> tuple[pathlib.Path | None, str]:
  """(binary, "") when the generator builds, else (None, why)."""
  try:
    return build(), ""
  except RuntimeError as e:
    return None, str(e)


def parse_output(stdout: str, latencies: str, rows_per_request: int) -> LoadResult:
  """The LoadResult of one run from the program's summary and its "CODE MICROS" lines."""
  seconds, sent, counts = None, None, {}
  for line in stdout.splitlines():
    parts = line.split()
    if parts[:1] == ["window_s"]:
      seconds = float(parts[1])
    elif parts[:1] == ["sent"]:
      sent = int(parts[1])
    elif parts[:1] == ["status"]:
      counts[parts[1]] = int(parts[2])
  if seconds is None or sent is None:
    raise RuntimeError(f"unexpected native_loadgen output:\n{stdout}")
  pairs = np.array(latencies.split(), dtype=np.int64).reshape(-1, 2)
  if len(pairs) != sent or sum(counts.values()) != sent:
    raise RuntimeError(f"native_loadgen: {len(pairs)} latencies, {counts} for {sent} requests")
  codes, lat_s = pairs[:, 0], pairs[:, 1] * 1e-6
  names = {0: "OK", 100: "EMPTY_RESPONSE"}
  ok = counts.pop("OK", 0)
  err_lat = {}
  for name in counts:
    code = next((c for c, n in names.items() if n == name), None)
    if code is None:
      import grpc
      code = grpc.StatusCode[name].value[0]
    err_lat[name] = lat_s[codes == code]
  return LoadResult(seconds, ok, counts, lat_s[codes == 0], rows_per_request, err_lat)


def run_load(address: str, payload: bytes, *, rows_per_request: int, concurrency: int = 16,
             processes: int = 1, duration: float = 5.0, rate: float | None = None,
             timeout: float | None = 10.0, warmup: float = 0.5) -> LoadResult:
  """loadgen.run_load's contract, sent from C++; the first `warmup` seconds are not recorded."""
  binary = build()
  with tempfile.TemporaryDirectory(prefix="native_loadgen_") as tmp:
    req, lat = pathlib.Path(tmp, "request.pb"), pathlib.Path(tmp, "latencies.txt")
    req.write_bytes(payload)
    cmd = [str(binary), "--address", address, "--request", str(req), "--latencies", str(lat),
           "--concurrency", str(max(concurrency, 1)), "--channels", str(max(processes, 1)),
           "--duration", str(duration), "--warmup", str(warmup),
           "--timeout", str(timeout or 0), "--rate", str(rate or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=warmup + duration + (timeout or 15) + 60)
    if proc.returncode != 0:
      raise RuntimeError(f"native_loadgen exited {proc.returncode}: {proc.stderr[-2000:]}")
    return parse_output(proc.stdout, lat.read_text(), rows_per_request)
