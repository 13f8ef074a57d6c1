"""Server flags side by side: closed-loop rate and the server's CPU per request of one model
under several `xlaserve serve` flag sets, all running at once and measured in turn, round after
round, so a noisy shared machine's drift falls on every set alike.

  python benchmarks/server_flags.py --model ctr_light --rows 1 --concurrency 16 \\
      --sets="--no-cpu-sync-dispatch|--cpu-sync-dispatch --xla-cpu-threads 0|"

Each `|`-separated set is one server (an empty set is the defaults). Prints one line per
measurement and a table of medians; writes server_flags.png and server_flags.json to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.context import cpu_seconds
from benchmarks.http_serving import scratch_repository
from benchmarks.load_generators import pick_loadgen
from benchmarks.loadgen import build_request, format_table
from benchmarks.load_generators import pick_loadgen  # noqa: E402
from benchmarks.serving import make_inputs, say, start_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repository", type=pathlib.Path, default=None,
                      help="model repository (default: the built-in demo repository)")
  parser.add_argument("--model", default="ctr_light", help="the model to load")
  parser.add_argument("--sets", default="--no-cpu-sync-dispatch"
                      "|--cpu-sync-dispatch --xla-cpu-threads 0|",
                      help="'|'-separated flag sets for xlaserve serve, one server each (an"
                      " empty set: the defaults); write --sets=... when it starts with --")
  parser.add_argument("--rows", type=int, default=32, help="rows per request")
  parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
  parser.add_argument("--rounds", type=int, default=3, help="measurements of each set")
  parser.add_argument("--duration", type=float, default=4.0, help="seconds per measurement")
  parser.add_argument("--loadgen", choices=("native", "python"), default=None,
                      help="load generator (default: the C++ one when it builds)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/server_flags"),
                      help="folder for server_flags.png and server_flags.json")
  return parser.parse_args(argv)


def _measure(run_load, proc, addr: str, payload: bytes, args) -> dict:
  """One closed-loop run against one server: req/s, p50/p99 and the server's CPU µs/request."""
  before = cpu_seconds(proc.pid)
  r = run_load(addr, payload, rows_per_request=args.rows, concurrency=args.concurrency,
               duration=args.duration)
  done = r.ok + sum(r.errors.values())
  return {"rps": r.rps, "p50_ms": r.pct_ms(50), "p99_ms": r.pct_ms(99),
          "errors": sum(r.errors.values()),
          "server_cpu_us": (cpu_seconds(proc.pid) - before) / max(done, 1) * 1e6}


def _plot(sets: list[str], runs: dict, path: pathlib.Path, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  x = np.arange(len(sets))
  labels = [s or "(defaults)" for s in sets]
  for i, s in enumerate(sets):
    a1.scatter([i] * len(runs[s]), [m["rps"] for m in runs[s]], color="C0")
    a2.scatter([i] * len(runs[s]), [m["server_cpu_us"] for m in runs[s]], color="C1")
  a1.set_xticks(x, labels, rotation=10, fontsize=8)
  a1.set_ylabel("requests/s")
  a1.set_title(f"{args.model}: {args.rows}-row requests, {args.concurrency} in flight")
  a2.set_xticks(x, labels, rotation=10, fontsize=8)
  a2.set_ylabel("server CPU µs / request")
  a2.set_title("server CPU per request (each dot one round)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  name, run_load = pick_loadgen(args.loadgen)
  say(f"load generator: {name}")
  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  from bundle import list_versions, read_manifest

  bundle = repo / args.model / str(list_versions(repo / args.model)[-1])
  signature = next(iter(read_manifest(bundle).signatures.values())).inputs
  payload = build_request(args.model, make_inputs(signature, args.rows, np.random.default_rng(0)))
  sets = [s.strip() for s in args.sets.split("|")]
  servers = {s: start_server(scratch_repository(repo, args.model), s.split()) for s in sets}
  runs: dict[str, list[dict]] = {s: [] for s in sets}
  try:
    for s, (proc, addr, _) in servers.items():  # warm each server's connection and buckets
      run_load(addr, payload, rows_per_request=args.rows, concurrency=args.concurrency,
               duration=1.0)
    for rnd in range(args.rounds):
      for s, (proc, addr, _) in servers.items():
        m = _measure(run_load, proc, addr, payload, args)
        runs[s].append(m)
        say(f"round {rnd + 1}/{args.rounds} [{s or 'defaults'}]: {m['rps']:.0f} req/s, server"
            f" {m['server_cpu_us']:.1f} µs/req, p99 {m['p99_ms']:.2f} ms")
  finally:
    for proc, _, _ in servers.values():
      proc.terminate()
      proc.wait(60)
  med = {s: {k: statistics.median(m[k] for m in runs[s]) for k in runs[s][0]} for s in sets}
  base = med[sets[0]]["rps"]
  print(format_table(
      ["flags", "req/s (median)", f"vs {sets[0] or 'defaults'}", "server CPU µs/req", "p50 ms",
       "p99 ms", "errors"],
      [[s or "(defaults)", round(med[s]["rps"]), f"{med[s]['rps'] / base:.3f}",
        f"{med[s]['server_cpu_us']:.1f}", f"{med[s]['p50_ms']:.2f}", f"{med[s]['p99_ms']:.2f}",
        sum(m["errors"] for m in runs[s])] for s in sets]))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "server_flags.json").write_text(json.dumps(
      {"model": args.model, "rows": args.rows, "concurrency": args.concurrency,
       "loadgen": name, "runs": runs, "medians": med}, indent=1))
  _plot(sets, runs, args.out / "server_flags.png", args)
  say(f"wrote {args.out / 'server_flags.png'} and {args.out / 'server_flags.json'}")


if __name__ == "__main__":
  main()
