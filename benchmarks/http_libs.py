"""Which asynchronous HTTP library the KServe v2 HTTP front end is built on, chosen by measurement.

  python benchmarks/http_libs.py [--seconds 4] [--concurrency 16] [--rounds 2]
                                 [--libs aiohttp,aiohttp-lowlevel,uvicorn,uvicorn-coalescing]

Each candidate serves the same minimal KServe v2 app in a subprocess on uvloop (server
metadata, model metadata and config as constant JSON, and `POST /v2/models/m/infer` that
reads Triton's binary tensor extension: the JSON header of `Inference-Header-Content-Length`
bytes, the tensor bytes into numpy with `np.frombuffer`, and answers `y = 2x` as binary data).
Triton's own `perf_analyzer -i http` sends 1-row requests at the given concurrency. Two numbers
per candidate: requests/s (client and server share the machine's cores, as in
benchmarks/http_serving.py) and the server process's CPU time per request, which a busy shared
machine disturbs far less than throughput. The model is free here: the numbers are the
library's cost per request. `uvicorn-coalescing` is uvicorn as the server runs it (one write
per response: serving/frontend/http/server.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBS = ("aiohttp", "aiohttp-lowlevel", "uvicorn", "uvicorn-coalescing")
SERVER_META = {"name": "bench", "version": "0", "extensions": []}
MODEL_META = {"name": "m", "versions": ["1"], "platform": "bench",
              "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
              "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
MODEL_CONFIG = {"name": "m", "platform": "bench", "max_batch_size": 8,
                "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
                "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}]}


def say(msg: str) -> None:
  print(f"[http-libs {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def infer_answer(header_len: int | None, body: bytes, served: list[int]) -> tuple[bytes, int]:
  """The whole per-request work every candidate shares: (response body, JSON header length)."""
  import numpy as np

  served[0] += 1
  view = memoryview(body)
  head = json.loads(body[:header_len] if header_len is not None else body)
  spec = head["inputs"][0]
  x = np.frombuffer(view[header_len:], np.float32).reshape(spec["shape"])
  y = (2 * x).tobytes()
  out = json.dumps({"model_name": "m", "model_version": "1", "outputs": [
      {"name": "y", "datatype": "FP32", "shape": list(x.shape),
       "parameters": {"binary_data_size": len(y)}}]}).encode()
  return out + y, len(out)


def get_answer(path: str, served: list[int]) -> dict | None:
  return {"/v2": SERVER_META, "/v2/models/m": MODEL_META, "/v2/models/m/config": MODEL_CONFIG,
          "/count": {"served": served[0]}}.get(path)


def serve_aiohttp(port: int, lowlevel: bool) -> None:
  """aiohttp: web.Application with its router, or the low-level web.Server (no router)."""
  import asyncio

  import uvloop
  from aiohttp import web

  served = [0]

  async def handle(request: web.BaseRequest) -> web.StreamResponse:
    if request.method == "POST":
      hl = request.headers.get("Inference-Header-Content-Length")
      body, n = infer_answer(None if hl is None else int(hl), await request.read(), served)
      return web.Response(body=body, headers={"Inference-Header-Content-Length": str(n)},
                          content_type="application/octet-stream")
    ans = get_answer(request.path, served)
    return web.json_response(ans) if ans is not None else web.Response(status=404)

  async def main() -> None:
    if lowlevel:
      await asyncio.get_running_loop().create_server(web.Server(handle, access_log=None),
                                                     "127.0.0.1", port)
    else:
      app = web.Application()
      app.router.add_route("*", "/{tail:.*}", handle)
      runner = web.AppRunner(app, access_log=None)
      await runner.setup()
      await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Event().wait()

  uvloop.run(main())


def serve_uvicorn(port: int, coalescing: bool) -> None:
  """uvicorn with httptools and a raw ASGI callable (no framework); `coalescing`: with the
  server's one-write-per-response transport."""
  import uvicorn

  served = [0]

  async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
      return
    if scope["method"] == "POST":
      chunks = []
      while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
          break
      hl = dict(scope["headers"]).get(b"inference-header-content-length")
      body, n = infer_answer(None if hl is None else int(hl), b"".join(chunks), served)
      headers = [(b"content-type", b"application/octet-stream"),
                 (b"inference-header-content-length", str(n).encode())]
    else:
      ans = get_answer(scope["path"], served)
      body = json.dumps(ans).encode() if ans is not None else b""
      headers = [(b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": 200 if body else 404,
                "headers": headers})
    await send({"type": "http.response.body", "body": body})

  http: object = "httptools"
  if coalescing:
    sys.path.insert(0, str(ROOT))
    from serving.frontend.http.server import coalescing_protocol_class
    http = coalescing_protocol_class()
  print("ready", flush=True)
  uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http=http, ws="none",
              lifespan="off", access_log=False, log_level="warning", proxy_headers=False,
              server_header=False, interface="asgi3")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def perf_analyzer(port: int, concurrency: int, seconds: float) -> dict[str, float]:
  """Requests/s and p50/p99 latency (ms) from perf_analyzer -i http, 1-row requests."""
  env = dict(os.environ)
  env["LD_LIBRARY_PATH"] = f"{ROOT / 'bench_out/pa_libs'}:{env.get('LD_LIBRARY_PATH', '')}"
  pa = pathlib.Path(sys.executable).parent / "perf_analyzer"
  out = subprocess.run(
      [str(pa), "-m", "m", "-u", f"127.0.0.1:{port}", "-i", "http", "-b", "1",
       "--concurrency-range", f"{concurrency}:{concurrency}",
       "--measurement-interval", str(int(seconds * 1000)),
       "--stability-percentage", "100", "--max-trials", "6"],
      capture_output=True, text=True, env=env, timeout=120 + 10 * seconds)
  text = out.stdout + out.stderr
  m = re.search(r"Throughput: ([\d.]+) infer/sec", text)
  if out.returncode != 0 or not m:
    raise RuntimeError(f"perf_analyzer failed ({out.returncode}):\n{text}")
  p50 = re.search(r"p50 latency: (\d+) usec", text)
  p99 = re.search(r"p99 latency: (\d+) usec", text)
  return {"rps": float(m.group(1)), "p50_ms": int(p50.group(1)) / 1e3 if p50 else float("nan"),
          "p99_ms": int(p99.group(1)) / 1e3 if p99 else float("nan")}


def measure(lib: str, concurrency: int, seconds: float) -> dict[str, float]:
  """One candidate in a fresh process: perf_analyzer's numbers and the server's CPU/request."""
  import psutil

  port = free_port()
  proc = subprocess.Popen([sys.executable, __file__, "--serve", lib, "--port", str(port)],
                          stdout=subprocess.PIPE, text=True)
  count_url = f"http://127.0.0.1:{port}/count"
  try:
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    server = psutil.Process(proc.pid)
    cpu0, n0 = sum(server.cpu_times()[:2]), json.load(urllib.request.urlopen(count_url))["served"]
    res = perf_analyzer(port, concurrency, seconds)
    cpu1, n1 = sum(server.cpu_times()[:2]), json.load(urllib.request.urlopen(count_url))["served"]
    return {**res, "cpu_us_per_request": (cpu1 - cpu0) / max(1, n1 - n0) * 1e6}
  finally:
    proc.terminate()
    proc.wait(10)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--libs", default=",".join(LIBS), help=f"comma-separated, from {LIBS}")
  ap.add_argument("--concurrency", type=int, default=16)
  ap.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window")
  ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating the libraries")
  ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.serve:
    if args.serve.startswith("uvicorn"):
      serve_uvicorn(args.port, coalescing=args.serve == "uvicorn-coalescing")
    else:
      serve_aiohttp(args.port, lowlevel=args.serve == "aiohttp-lowlevel")
    return
  best: dict[str, dict[str, float]] = {}
  for r in range(args.rounds):
    for lib in args.libs.split(","):
      res = measure(lib, args.concurrency, args.seconds)
      say(f"round {r + 1} {lib:>18}: {res['rps']:8.0f} req/s  p50 {res['p50_ms']:.2f} ms"
          f"  p99 {res['p99_ms']:.2f} ms  server CPU {res['cpu_us_per_request']:.0f} us/request")
      old = best.setdefault(lib, res)
      old["rps"] = max(old["rps"], res["rps"])
      old["cpu_us_per_request"] = min(old["cpu_us_per_request"], res["cpu_us_per_request"])
  print(f"\n{'library':>18} | {'req/s (best)':>12} | {'server CPU us/req (best)':>24}")
  for lib, res in best.items():
    print(f"{lib:>18} | {res['rps']:12.0f} | {res['cpu_us_per_request']:24.1f}")


if __name__ == "__main__":
  main()
