"""PyTorch models converted by export.torch: served rows/s against the raw jitted converted
function, torch eager and torch.compile, on the same cores in one run.

  python benchmarks/torch_models.py [--models dlrm,dcn,encoder] [--seconds 3] [--buckets 1,8,...]
                                    [--concurrency 16,32,64] [--out DIR]

For each model (demo/torch_models.py at its default sizes, random weights):
1. Compile: export_torch (capture + lowering + jax.export) and the server's load (every bucket
   compiled) timed; torch.compile's first call (its compile) timed too.
2. Raw: the converted function under jax.jit, torch eager (no_grad) and torch.compile'd, each
   called back to back at every batch size of the buckets: rows/s.
3. Served: `xlaserve serve` in a subprocess over the bundle, driven over gRPC by
   the load generator (benchmarks/native_loadgen.cc when it builds, else benchmarks/loadgen.py)
   with `--request-rows`-row requests in a closed loop at each `--concurrency`: the best rate
   (saturation) and where it was reached.
Prints a table and writes torch_models.json to --out. Needs torch (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import loadgen, native_loadgen  # noqa: E402
from benchmarks.loadgen import build_request, format_table, saturate  # noqa: E402

BUCKETS = (1, 8, 32, 128, 256)


def say(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def models() -> dict[str, tuple[Any, Callable[[int], tuple[Any, ...]]]]:
  """name -> (torch module, rows(n) -> example inputs)."""
  import torch
  from demo.torch_models import (TorchCtrConfig, TorchDCNv2, TorchDLRM, TorchEncoderScorer,
                                 ctr_inputs, token_inputs)

  torch.manual_seed(0)
  cfg = TorchCtrConfig()
  return {
      "dlrm": (TorchDLRM(cfg), lambda n: ctr_inputs(cfg, n, bags=True)),
      "dcn": (TorchDCNv2(cfg), lambda n: ctr_inputs(cfg, n, bags=False)),
      "encoder": (TorchEncoderScorer(), lambda n: token_inputs(n)),
  }


def rate(fn: Callable[[], Any], rows: int, seconds: float, windows: int = 3) -> float:
  """rows/s of `fn` called back to back: the best of `windows` windows splitting `seconds`
  (after two warm-up calls), so a busy shared machine's pauses count against no method."""
  fn(), fn()
  best = 0.0
  for _ in range(windows):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / windows:
      fn()
      n += 1
    best = max(best, n * rows / (time.perf_counter() - t0))
  return best


def raw_rates(model: Any, rows: Callable[[int], tuple[Any, ...]], seconds: float,
              buckets: tuple[int, ...] = BUCKETS, torch_threads: tuple[int, ...] = (1,)
              ) -> tuple[dict[str, dict[int, float]], float, float]:
  """({"jax": ..., "eager": ..., "compile": ...} bucket -> rows/s, export s, torch.compile s);
  torch's rates are its best over `torch_threads` (torch.set_num_threads) at each bucket."""
  import jax
  import jax.numpy as jnp
  import torch
  from export.torch import lowered, torch_program

  t0 = time.perf_counter()
  prog = torch_program(model, rows(4))
  capture_s = time.perf_counter() - t0
  fn = jax.jit(lowered(prog))
  params = {k: jnp.asarray(v) for k, v in prog.params.items()}
  model.eval()
  compiled = torch.compile(model)
  out: dict[str, dict[int, float]] = {"jax": {}, "eager": {}, "compile": {}}
  compile_s = float("nan")
  for b in buckets:
    xs = rows(b)
    ins = {i.name: jnp.asarray(x.numpy()) for i, x in zip(prog.inputs, xs)}
    out["jax"][b] = rate(lambda: jax.block_until_ready(fn(params, ins)), b, seconds)
    with torch.no_grad():
      t0 = time.perf_counter()
      compiled(*xs)
      if b == buckets[0]:
        compile_s = time.perf_counter() - t0
      for k, call in (("eager", model), ("compile", compiled)):
        out[k][b] = max(_at_threads(t, lambda: rate(lambda: call(*xs), b, seconds))
                        for t in torch_threads)
    say(f"  bucket {b}: " + ", ".join(f"{k} {v[b]:.0f} rows/s" for k, v in out.items()))
  return out, capture_s, compile_s


def _at_threads(threads: int, fn: Callable[[], float]) -> float:
  """fn() with torch.set_num_threads(threads)."""
  import torch

  torch.set_num_threads(threads)
  return fn()


def served_rate(repo: pathlib.Path, name: str, rows: Callable[[int], tuple[Any, ...]],
                request_rows: int, seconds: float, run_load: Callable[..., Any],
                concurrencies: tuple[int, ...] = (16,),
                server_args: tuple[str, ...] = ()) -> tuple[float, float, float, int]:
  """(rows/s at saturation, p50 ms there, load s, the concurrency that reached it) of `xlaserve
  serve` over the bundle: the saturated closed-loop rate over `concurrencies`
  (`loadgen.saturate`; with buckets of 1024 rows and two instances, 16 requests of 128 rows fill
  only the two running batches)."""
  from procutil import serve

  t0 = time.perf_counter()
  proc = serve(["--model-repository", str(repo), "--grpc-port", "0", "--http-port", "-1",
                "--metrics-port", "-1", "--compile-cache", "none", *server_args], timeout=600)
  load_s = time.perf_counter() - t0
  try:
    from bundle import read_manifest
    names = [t.name for t in read_manifest(repo / name / "1").signatures["serve"].inputs]
    payload = build_request(name, dict(zip(names, (x.numpy() for x in rows(request_rows)))))
    run_load(proc.address, payload, rows_per_request=request_rows, concurrency=8,
             duration=1.0)  # warm

    def closed_loop(c: int) -> Any:
      res = run_load(proc.address, payload, rows_per_request=request_rows, concurrency=c,
                     duration=seconds)
      if res.errors:
        raise RuntimeError(f"served {name}: errors {res.errors}")
      say(f"  concurrency {c}: {res.rows_per_s:.0f} rows/s, p50 {res.pct_ms(50):.2f} ms")
      return res

    c, res = saturate(closed_loop, concurrencies)
    return res.rows_per_s, res.pct_ms(50), load_s, c
  finally:
    proc.kill()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="dlrm,dcn,encoder")
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--request-rows", type=int, default=128)
  p.add_argument("--torch-threads", default=None,
                 help="comma-separated intra-op thread counts (torch.set_num_threads) torch is"
                 " timed at; each bucket keeps its best, so torch gets the cores the server has"
                 " (default: 1 and the machine's CPU count). On a busy shared machine one"
                 " thread can win: torch's OpenMP pool stalls on every op when a thread is"
                 " descheduled (measured here: 60 ms per 8-row DCN call at 2 threads)")
  p.add_argument("--buckets", default=",".join(map(str, BUCKETS)),
                 help="batch sizes: every method is timed at each, and the bundle is exported"
                 f" with them as its buckets (default {','.join(map(str, BUCKETS))})")
  p.add_argument("--concurrency", default="16,32,64,128",
                 help="closed-loop concurrencies of the served run; the best rate is the"
                 " saturated one (large buckets need more requests in flight to fill)")
  p.add_argument("--server-args", default="",
                 help="extra flags for xlaserve serve, e.g. --server-args=--cpu-sync-dispatch")
  p.add_argument("--out", default="bench_out")
  args = p.parse_args()
  buckets = tuple(sorted(int(b) for b in args.buckets.split(",")))
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
  import torch
  from export import ExportConfig
  from export.torch import export_torch

  spec = args.torch_threads or f"1,{os.cpu_count()}"
  threads = tuple(sorted({int(t) for t in spec.split(",")}))
  binary, why = native_loadgen.available()
  run_load = native_loadgen.run_load if binary else loadgen.run_load
  say(f"load generator: {'native (C++)' if binary else f'python ({why.splitlines()[0]})'}")
  say(f"torch {torch.__version__}, best of {threads} threads; cpus {os.cpu_count()};"
      f" load average {os.getloadavg()[0]:.1f}")
  results, table = {}, []
  for name, (model, rows) in models().items():
    if name not in args.models.split(","):
      continue
    say(f"{name}: raw rates")
    raw, capture_s, compile_s = raw_rates(model, rows, args.seconds, buckets, threads)
    with tempfile.TemporaryDirectory() as tmp:
      repo = pathlib.Path(tmp)
      t0 = time.perf_counter()
      export_torch(model, rows(4), repository=repo, name=name, output_names=["score"],
                   config=ExportConfig(batch_buckets=buckets))
      export_s = time.perf_counter() - t0
      say(f"{name}: served")
      served, p50, load_s, conc = served_rate(
          repo, name, rows, args.request_rows, args.seconds, run_load,
          tuple(int(c) for c in args.concurrency.split(",")), tuple(args.server_args.split()))
    best = lambda k: max(raw[k].values())  # noqa: E731
    results[name] = {"raw": raw, "served_rows_per_s": served, "served_p50_ms": p50,
                     "served_concurrency": conc,
                     "export_s": export_s, "capture_s": capture_s, "server_load_s": load_s,
                     "torch_compile_s": compile_s}
    table.append([name, served, conc, best("jax"), best("eager"), best("compile"),
                  served / best("compile"), export_s, load_s, compile_s])
  print(format_table(["model", "served rows/s", "at concurrency", "jax raw best",
                      "torch eager best", "torch.compile best", "served/compile", "export s",
                      "server load s", "torch.compile s"], table))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "torch_models.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
