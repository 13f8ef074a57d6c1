"""Context inputs against the same model served flat: one user x N candidates per request.

  python benchmarks/context.py [--candidates 200] [--seconds 6] [--rounds 2] [--out DIR]

Exports the demo ranking model (models/ranking.py: a 100-id click history pooled, the user's
profile and the query's 64-d embedding through a user MLP; an ad tower and a head) twice into
a scratch repository: `ranker` with the user side as context inputs (sent once, computed once
per request) and `ranker_flat` (the user's rows repeated on every candidate row by the
client). One `xlaserve serve` serves both; each is driven in turn at
saturation (closed loop, several concurrencies, the best kept) by the C++ load generator
(benchmarks/native_loadgen.cc; the Python one where it does not build), with the same requests
checked to give the same answers first. Reports candidates/s, latency, request bytes on the wire
and the server's CPU per request; prints a table, writes context.png and context.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.http_serving import free_port, start_server  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402

MODELS = ("ranker", "ranker_flat")
TARGET = 2.0  # issue 15: context candidates/s at least twice the flat model's


def say(msg: str) -> None:
  print(f"[context-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def requests(candidates: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """The same user and candidates as each model takes them: context rows once, or repeated."""
  from models.ranking import RankerConfig

  cfg, rng = RankerConfig.demo(), np.random.default_rng(seed)
  history = rng.integers(0, cfg.history_rows, (1, cfg.history_len)).astype(np.int32)
  user_dense = rng.normal(size=(1, cfg.user_dense)).astype(np.float32)
  query = rng.normal(size=(1, cfg.query_dim)).astype(np.float32)
  query /= np.linalg.norm(query)  # a two-tower query embedding is a unit vector
  ads = {"ad_sparse": rng.integers(0, 1 << 20, (candidates, len(cfg.ad_table_sizes)))
         .astype(np.int32),
         "ad_dense": rng.normal(size=(candidates, cfg.ad_dense)).astype(np.float32)}
  user = {"history": history, "user_dense": user_dense, "query": query}
  return {"ranker": {**user, **ads},
          "ranker_flat": {**{k: np.repeat(v, candidates, 0) for k, v in user.items()}, **ads}}


def check_same_answers(address: str, cases: dict[str, dict[str, np.ndarray]]) -> float:
  """Largest |difference| between the two models' answers to the same request (tritonclient)."""
  import tritonclient.grpc as tc
  from tritonclient.utils import np_to_triton_dtype

  got = {}
  with tc.InferenceServerClient(address) as client:
    for model in MODELS:
      ins = []
      for name, arr in cases[model].items():
        i = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        i.set_data_from_numpy(arr)
        ins.append(i)
      got[model] = client.infer(model, ins, client_timeout=60).as_numpy("prob")
  return float(np.abs(got["ranker"] - got["ranker_flat"]).max())


def loadgen():
  """(run_load, name): the C++ generator when it builds, else the Python one."""
  from benchmarks import native_loadgen

  binary, why = native_loadgen.available()
  if binary is not None:
    return native_loadgen.run_load, "native_loadgen (C++)"
  say(f"C++ load generator unavailable ({why}); using benchmarks/loadgen.py")
  from benchmarks.loadgen import run_load
  return run_load, "loadgen.py (Python)"


def cpu_seconds(pid: int) -> float:
  import psutil
  return sum(psutil.Process(pid).cpu_times()[:2])


def measure(address: str, pid: int, model: str, payload: bytes, candidates: int,
            args: argparse.Namespace, run_load) -> dict[str, float]:
  """The best closed-loop run over the concurrencies: candidates/s, latency, CPU/request."""
  best: dict[str, float] = {}
  for conc in args.concurrency:
    cpu0 = cpu_seconds(pid)
    r = run_load(address, payload, rows_per_request=candidates, concurrency=conc,
                 duration=args.seconds, timeout=30.0)
    cpu = cpu_seconds(pid) - cpu0
    if r.errors:
      raise RuntimeError(f"{model}: errors under load: {r.errors}")
    row = {"concurrency": conc, "candidates_per_s": r.rows_per_s, "requests_per_s": r.rps,
           "p50_ms": r.pct_ms(50), "p99_ms": r.pct_ms(99),
           "cpu_ms_per_request": cpu / max(r.ok, 1) * 1e3}
    say(f"  {model} c{conc}: {r.rows_per_s:,.0f} candidates/s, p50 {row['p50_ms']:.1f} ms,"
        f" p99 {row['p99_ms']:.1f} ms")
    if row["candidates_per_s"] > best.get("candidates_per_s", 0.0):
      best = row
  return best


def table(results: dict[str, dict], sizes: dict[str, int]) -> str:
  rows = [[m, f"{r['candidates_per_s']:,.0f}", f"{r['requests_per_s']:,.1f}",
           f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{sizes[m]:,}",
           f"{r['cpu_ms_per_request']:.2f}", r["concurrency"]] for m, r in results.items()]
  return format_table(["model", "candidates/s", "requests/s", "p50 ms", "p99 ms",
                       "request bytes", "server CPU ms/req", "concurrency"], rows)


def plot(results: dict[str, dict], sizes: dict[str, int], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 4))
  for ax, (key, label) in zip(axes, [("candidates_per_s", "candidates/s at saturation"),
                                     ("bytes", "request bytes on the wire")]):
    values = [sizes[m] if key == "bytes" else results[m][key] for m in MODELS]
    ax.bar(MODELS, values, color=["tab:green", "tab:gray"])
    ax.set_title(label)
    ax.set_ylim(0, max(values) * 1.25)
    for i, v in enumerate(values):
      ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--candidates", type=int, default=200, help="candidate ads per request")
  ap.add_argument("--seconds", type=float, default=6.0, help="seconds per load run")
  ap.add_argument("--rounds", type=int, default=2,
                  help="rounds, the models alternating; the best of them is reported")
  ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                  default=[4, 12], help="closed-loop concurrencies tried per round")
  ap.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  ap.add_argument("--out", type=pathlib.Path, default=ROOT / "bench_out" / "context")
  return ap.parse_args(argv)


def export_models(repo: pathlib.Path) -> None:
  from demo.models import build_ranker

  for model in MODELS:
    t0 = time.perf_counter()
    build_ranker(repo, name=model, flat=model == "ranker_flat", progress=say)
    say(f"exported {model} in {time.perf_counter() - t0:.1f}s")


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  run_load, generator = loadgen()
  repo = pathlib.Path(tempfile.mkdtemp(prefix="xlaserve-context-bench-"))
  proc = None
  try:
    export_models(repo)
    port = free_port()
    proc = start_server(repo, port, free_port(), args.server_args.split())
    address = f"127.0.0.1:{port}"
    cases = requests(args.candidates)
    diff = check_same_answers(address, cases)
    say(f"both models give the same answers (largest difference {diff:.2e})")
    payloads = {m: build_request(m, cases[m]) for m in MODELS}
    sizes = {m: len(p) for m, p in payloads.items()}
    results: dict[str, dict] = {}
    for rnd in range(args.rounds):
      say(f"round {rnd + 1} of {args.rounds} ({generator})")
      for m in MODELS:
        r = measure(address, proc.pid, m, payloads[m], args.candidates, args, run_load)
        if r["candidates_per_s"] > results.get(m, {}).get("candidates_per_s", 0.0):
          results[m] = r
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(60)
    shutil.rmtree(repo, ignore_errors=True)
  ratio = results["ranker"]["candidates_per_s"] / results["ranker_flat"]["candidates_per_s"]
  print(table(results, sizes))
  verdict = (f"context / flat candidates/s at 1 user x {args.candidates} candidates: {ratio:.2f}"
             f" (target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'}); request bytes"
             f" {sizes['ranker']:,} vs {sizes['ranker_flat']:,}"
             f" ({sizes['ranker_flat'] / sizes['ranker']:.1f}x)")
  print(verdict)
  (args.out / "context.json").write_text(json.dumps({
      "candidates": args.candidates, "load_generator": generator, "seconds": args.seconds,
      "rounds": args.rounds, "cores": os.cpu_count(), "max_abs_difference": diff,
      "request_bytes": sizes, "results": results, "ratio": ratio, "verdict": verdict},
      indent=1))
  plot(results, sizes, args.out / "context.png",
       f"1 user x {args.candidates} candidates: context inputs vs flat ({os.cpu_count()} cores)")
  say(f"wrote {args.out / 'context.png'} and {args.out / 'context.json'}")


if __name__ == "__main__":
  main()
