"""The C++ HTTP load generator (benchmarks/native_http_loadgen.cc), built on demand, behind
loadgen's API: KServe v2 inference with binary tensors, the body written by `tritonclient.http`
itself, over keep-alive connections driven by one epoll thread (no library but libc).

`run_load` keeps native_loadgen.run_load's contract (same LoadResult, statuses as the gRPC codes
Triton's HTTP statuses stand for), so benchmarks measure both protocols with the same phases.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import tempfile

import numpy as np

from benchmarks.loadgen import LoadResult
from benchmarks.native_loadgen import COMMON, compile_cc, parse_output

SOURCE = pathlib.Path(__file__).resolve().with_name("native_http_loadgen.cc")
BINARY = SOURCE.parent.parent / "bench_out" / "native_loadgen" / "native_http_loadgen"


@dataclasses.dataclass(frozen=True)
class HttpRequest:
  """One inference request as sent on the wire: its path, body and JSON header's length."""

  path: str
  body: bytes
  header_length: int


def build(force: bool = False) -> pathlib.Path:
  """Compiles the generator if missing or stale; returns its path. Raises RuntimeError on failure."""
  return compile_cc(SOURCE, BINARY, [], force=force,
                    headers=(COMMON, SOURCE.with_name("native_http_answer.h")))


def available() -> tuple[pathlib.Path | None, str]:
  """(binary, "") when the generator builds, else (None, why)."""
  try:
    return build(), ""
  except RuntimeError as e:
    return None, str(e)


def http_request(model: str, inputs: dict[str, np.ndarray], *, version: str = "") -> HttpRequest:
  """The request tritonclient.http sends for `inputs`: every tensor binary, and every output
  asked for binary (`binary_data_output`), as perf_analyzer sends by default."""
  import tritonclient.http as httpclient
  from tritonclient.utils import np_to_triton_dtype

  tensors = []
  for name, arr in inputs.items():
    t = httpclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr, binary_data=True)
    tensors.append(t)
  body, header_length = httpclient.InferenceServerClient.generate_request_body(tensors)
  path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
  return HttpRequest(path, body, header_length if header_length is not None else len(body))


def command(address: str, request: HttpRequest, body_path: pathlib.Path, *,
            headers: tuple[str, ...] = ()) -> list[str]:
  """The generator's command line for `request` (its body already written to `body_path`),
  without the load flags."""
  cmd = [str(build()), "--address", address, "--path", request.path, "--body", str(body_path),
         "--header-length", str(request.header_length)]
  for h in headers:
    cmd += ["--header", h]
  return cmd


def run_load(address: str, request: HttpRequest, *, rows_per_request: int, concurrency: int = 16,
             processes: int = 1, duration: float = 5.0, rate: float | None = None,
             timeout: float | None = 10.0, warmup: float = 0.5,
             headers: tuple[str, ...] = ()) -> LoadResult:
  """native_loadgen.run_load's contract over HTTP. A closed loop opens one connection per
  request in flight; an open loop spreads its requests over 256, opening more (up to 768) while
  none is idle (`processes` is ignored: one thread drives them all)."""
  del processes
  with tempfile.TemporaryDirectory(prefix="native_http_loadgen_") as tmp:
    body, lat = pathlib.Path(tmp, "body.bin"), pathlib.Path(tmp, "latencies.txt")
    body.write_bytes(request.body)
    cmd = command(address, request, body, headers=headers) + [
        "--latencies", str(lat), "--concurrency", str(max(concurrency, 1)),
        "--duration", str(duration), "--warmup", str(warmup), "--timeout", str(timeout or 0),
        "--rate", str(rate or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=warmup + duration + (timeout or 15) + 60)
    if proc.returncode != 0:
      raise RuntimeError(f"native_http_loadgen exited {proc.returncode}: {proc.stderr[-2000:]}")
    return parse_output(proc.stdout, lat.read_text(), rows_per_request)
