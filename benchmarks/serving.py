"""Serving throughput and latency against the raw jitted model, measured in one run.

  python benchmarks/serving.py [--repository DIR] [--model dlrm] [--duration 8] [--out DIR]
                               [--frontend native|python|both] [--loadgen native|python]

1. Raw ceiling: the bundle's own compiled executables, called back to back in this
   process (no gRPC, no batching), rows/s at every bucket: the issue's ceiling. Also with two
   callers at once (two batches in flight, as the server runs two instances on CPU), the
   machine's real ceiling, reported beside it.
2. Served: `xlaserve serve` in a subprocess, driven over gRPC on 127.0.0.1 by
   the load generator: 32-row requests at saturation, single-row requests at
   concurrency 16, a lone request, and 32-row requests at 30, 50 and 70% of the saturated
   rate (open loop: sent on schedule whatever the answers).
The load generator is benchmarks/native_loadgen.cc (C++, one thread; the default when it
builds) or benchmarks/loadgen.py (Python processes, which take a good part of a core from the
server on a small machine); the report says which. `--frontend both` measures the Python and the native gRPC front end back to back against
the same raw ceiling. Prints a table, writes serving.png and serving.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import build_request, format_table, run_load  # noqa: E402


def say(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_inputs(engine_inputs, rows: int, rng) -> dict[str, np.ndarray]:
  from bundle import numpy_dtype

  out = {}
  for t in engine_inputs:
    dt = numpy_dtype(t.dtype)
    shape = (rows, *t.shape[1:])
    out[t.name] = (rng.integers(0, 1_000_000, shape).astype(dt) if dt.kind in "iu"
                   else rng.random(shape).astype(dt))
  return out


def _raw_rate(engine, bucket: int, inputs: dict, seconds: float, callers: int) -> float:
  """Batches/s of `callers` threads each dispatching back to back (8 ahead, then fetching)."""
  counts = [0] * callers
  end = time.perf_counter() + seconds

  def call(i: int) -> None:
    while time.perf_counter() < end:
      handles = [engine.dispatch(bucket=bucket, inputs=inputs) for _ in range(8)]
      for h in handles:
        engine.fetch(h)
      counts[i] += 8

  t0 = time.perf_counter()
  threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return sum(counts) / (time.perf_counter() - t0)


def raw_ceiling(bundle: pathlib.Path, seconds_per_bucket: float) -> tuple[list, list]:
  """rows/s of the compiled executables at each bucket, called back to back by one caller
  (`rows_per_s`) and by two at once (`rows_per_s_2`); returns (rows, engine inputs)."""
  from serving.engines import BundleEngine

  engine = BundleEngine(bundle)
  engine.warmup(progress=lambda m: say(f"raw: {m}"))
  rng = np.random.default_rng(0)
  results = []
  for b in engine.buckets:
    inp = make_inputs(engine.inputs, b, rng)
    for _ in range(3):
      engine.fetch(engine.dispatch(bucket=b, inputs=inp))
    # Best of three short rounds, alternating one and two callers: noise on a shared machine
    # only ever slows a round down, so the best round is the ceiling.
    rounds = [(_raw_rate(engine, b, inp, seconds_per_bucket / 6, 1),
               _raw_rate(engine, b, inp, seconds_per_bucket / 6, 2)) for _ in range(3)]
    one, two = max(r[0] for r in rounds), max(r[1] for r in rounds)
    results.append({"bucket": b, "rows_per_s": one * b, "ms_per_batch": 1e3 / one,
                    "rows_per_s_2": two * b})
    say(f"raw bucket {b:>5}: {one * b:>10.0f} rows/s, two callers {two * b:>10.0f} rows/s")
  inputs = engine.inputs
  engine.close()
  return results, inputs


def start_server(repo: pathlib.Path, extra: list[str], *,
                 metrics: bool = False) -> tuple[subprocess.Popen, str, str | None]:
  """`xlaserve serve` on a free gRPC port (and metrics port, with `metrics`), once its models
  are loaded: (process, gRPC address, metrics URL or None)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repo),
       "--grpc-port", "0", "--metrics-port", "0" if metrics else "-1", *extra],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  lines, ready = [], threading.Event()

  def pump():
    for line in proc.stdout:
      lines.append(line)
      if "try it:" in line or "models loaded" in line:
        ready.set()
    ready.set()

  threading.Thread(target=pump, daemon=True).start()
  if not ready.wait(600) or proc.poll() is not None:
    raise RuntimeError("server did not start:\n" + "".join(lines))
  port = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1)
  url = re.search(r"Prometheus metrics at (http://\S+)", "".join(lines)) if metrics else None
  say(f"server ready on port {port}")
  return proc, f"127.0.0.1:{port}", url.group(1) if url else None


def pick_loadgen(choice: str | None) -> tuple[str, Callable]:
  """(name, run_load) of the load generator: the C++ one by default when it builds."""
  if choice == "python":
    return "python", run_load
  from benchmarks import native_loadgen
  binary, why = native_loadgen.available()
  if binary is not None:
    return "native", native_loadgen.run_load
  if choice == "native":
    raise SystemExit(f"--loadgen native: the C++ load generator does not build: {why}")
  say(f"C++ load generator unavailable, using the Python one: {why.splitlines()[0]}")
  return "python", run_load


def measure_served(repo: pathlib.Path, args, inputs, frontend: str) -> dict:
  """Starts `xlaserve serve --frontend FRONTEND` and runs every load phase against it."""
  run_load = args.run_load
  proc, addr, _ = start_server(repo, ["--frontend", frontend, *args.server_args.split()])
  rng = np.random.default_rng(1)
  big = build_request(args.model, make_inputs(inputs, args.request_rows, rng))
  one = build_request(args.model, make_inputs(inputs, 1, rng))
  runs = {}
  try:
    say("warming the connection ...")
    run_load(addr, one, rows_per_request=1, concurrency=4, duration=1.0)
    say(f"{args.request_rows}-row requests at saturation ...")
    runs["batched_saturation"] = run_load(addr, big, rows_per_request=args.request_rows,
                                          concurrency=32, processes=args.processes,
                                          duration=args.duration)
    say("single-row requests, concurrency 16 ...")
    runs["single_c16"] = run_load(addr, one, rows_per_request=1, concurrency=16,
                                  processes=args.processes, duration=args.duration)
    say("a lone single-row request (concurrency 1) ...")
    runs["lone"] = run_load(addr, one, rows_per_request=1, concurrency=1,
                            duration=args.duration / 2)
    say(f"{args.request_rows}-row requests, lone ...")
    runs["batched_lone"] = run_load(addr, big, rows_per_request=args.request_rows,
                                    concurrency=1, duration=args.duration / 2)
    for pct in (30, 50, 70):  # the load curve up to the point (70%)
      rate = pct / 100 * runs["batched_saturation"].rps
      say(f"{args.request_rows}-row requests at {pct}% of saturation ({rate:.0f} req/s, open"
          " loop)")
      runs[f"batched_{pct}pct"] = run_load(addr, big, rows_per_request=args.request_rows,
                                           rate=rate, processes=args.processes,
                                           duration=args.duration)
  finally:
    proc.terminate()
    proc.wait(60)
  return runs


def report(runs: dict, raw: list, best: dict, args, frontend: str) -> dict:
  """Prints the phase table and the headline ratios of one front end; returns the summary."""
  headers = ["phase", "req/s", "rows/s", "p50 ms", "p99 ms", "errors"]
  rows = [[k, r.rps, r.rows_per_s, r.pct_ms(50), r.pct_ms(99), sum(r.errors.values())]
          for k, r in runs.items()]
  print()
  print(f"== {frontend} front end, {args.loadgen} load generator ==")
  print(format_table(["bucket", "raw rows/s", "ms/batch", "raw rows/s, 2 callers"],
                     [[r["bucket"], r["rows_per_s"], r["ms_per_batch"], r["rows_per_s_2"]]
                      for r in raw]))
  print()
  print(format_table(headers, rows))
  ratio = runs["batched_saturation"].rows_per_s / best["rows_per_s"]
  best2 = max(raw, key=lambda r: r["rows_per_s_2"])
  ratio2 = runs["batched_saturation"].rows_per_s / best2["rows_per_s_2"]
  p99_70 = runs["batched_70pct"].pct_ms(99)
  lone_p50 = runs["batched_lone"].pct_ms(50)
  summary = {
      "raw_best_rows_per_s": best["rows_per_s"], "raw_best_bucket": best["bucket"],
      "served_rows_per_s": runs["batched_saturation"].rows_per_s,
      "served_over_raw": ratio,
      "raw_two_callers_best_rows_per_s": best2["rows_per_s_2"],
      "served_over_raw_two_callers": ratio2,
      "single_row_c16_rows_per_s": runs["single_c16"].rows_per_s,
      "single_row_c16_p99_ms": runs["single_c16"].pct_ms(99),
      "p99_at_70pct_ms": p99_70, "lone_p50_ms": lone_p50,
      "p99_at_70pct_over_lone_p50": p99_70 / lone_p50, "loadgen": args.loadgen,
  }
  print()
  print(f"served / raw (32-row requests at saturation vs best bucket {best['bucket']}):"
        f" {ratio:.3f}")
  print(f"served / raw with two callers at once (best bucket {best2['bucket']}, the machine's"
        f" ceiling): {ratio2:.3f}")
  print(f"single-row requests at concurrency 16: {summary['single_row_c16_rows_per_s']:.0f} rows/s,"
        f" p99 {summary['single_row_c16_p99_ms']:.2f} ms")
  print(f"p99 at 70% load / p50 of a lone request: {p99_70:.2f} / {lone_p50:.2f} ms ="
        f" {p99_70 / lone_p50:.2f}x")
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repository", type=pathlib.Path, default=None,
                      help="model repository (default: the built-in demo repository)")
  parser.add_argument("--model", default="dlrm", help="model to load-test")
  parser.add_argument("--duration", type=float, default=8.0, help="seconds per load phase")
  parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
  parser.add_argument("--request-rows", type=int, default=32, help="rows per batched request")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/serving"))
  parser.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  parser.add_argument("--frontend", choices=("native", "python", "both"), default="native",
                      help="gRPC front end of the served phases; both: python, then native")
  parser.add_argument("--loadgen", choices=("native", "python"), default=None,
                      help="load generator: C++ (benchmarks/native_loadgen.cc) or Python"
                           " (benchmarks/loadgen.py); default: native when it builds, else python")
  args = parser.parse_args()
  args.loadgen, args.run_load = pick_loadgen(args.loadgen)
  say(f"load generator: {args.loadgen}")
  args.out.mkdir(parents=True, exist_ok=True)

  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  from bundle import list_versions
  bundle = repo / args.model / str(list_versions(repo / args.model)[-1])

  say("measuring the raw jitted model (the ceiling) ...")
  raw, inputs = raw_ceiling(bundle, max(2.0, args.duration / 2))
  best = max(raw, key=lambda r: r["rows_per_s"])

  frontends = ["python", "native"] if args.frontend == "both" else [args.frontend]
  results = {}
  for frontend in frontends:
    say(f"--- {frontend} gRPC front end ---")
    runs = measure_served(repo, args, inputs, frontend)
    results[frontend] = (runs, report(runs, raw, best, args, frontend))
  if len(frontends) > 1:
    print()
    print(format_table(["front end", "served rows/s", "served/raw", "1-row c16 rows/s",
                        "p99@70% / lone p50"],
                       [[f, r[1]["served_rows_per_s"], r[1]["served_over_raw"],
                         r[1]["single_row_c16_rows_per_s"], r[1]["p99_at_70pct_over_lone_p50"]]
                        for f, r in results.items()]))
  runs, summary = results[frontends[-1]]
  ratio = summary["served_over_raw"]
  (args.out / "serving.json").write_text(json.dumps(
      {"raw": raw, "loadgen": args.loadgen, "frontends": {
          f: {"runs": {k: {"rps": r.rps, "rows_per_s": r.rows_per_s, "p50_ms": r.pct_ms(50),
                           "p99_ms": r.pct_ms(99), "errors": r.errors} for k, r in rn.items()},
              "summary": sm} for f, (rn, sm) in results.items()}}, indent=1))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  a1.plot([r["bucket"] for r in raw], [r["rows_per_s"] for r in raw], "o-", label="raw jitted")
  a1.plot([r["bucket"] for r in raw], [r["rows_per_s_2"] for r in raw], "s:",
          label="raw jitted, two callers")
  a1.axhline(runs["batched_saturation"].rows_per_s, color="C1",
             label=f"served, {args.request_rows}-row requests")
  a1.axhline(runs["single_c16"].rows_per_s, color="C2", ls="--", label="served, 1-row c=16")
  a1.set_xscale("log", base=2)
  a1.set_xlabel("bucket (rows per batch)")
  a1.set_ylabel("rows/s")
  a1.legend()
  a1.set_title(f"throughput (served/raw = {ratio:.2f})")
  names = list(runs)
  x = np.arange(len(names))
  a2.bar(x - 0.2, [runs[n].pct_ms(50) for n in names], 0.4, label="p50")
  a2.bar(x + 0.2, [runs[n].pct_ms(99) for n in names], 0.4, label="p99")
  a2.set_xticks(x, names, rotation=20)
  a2.set_ylabel("ms")
  a2.legend()
  a2.set_title("latency")
  fig.tight_layout()
  fig.savefig(args.out / "serving.png", dpi=110)
  say(f"wrote {args.out / 'serving.png'} and {args.out / 'serving.json'}")


if __name__ == "__main__":
  main()
