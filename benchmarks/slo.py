"""Throughput at a latency bound, with MLPerf LoadGen's Server scenario: the fixed-delay batcher
against the latency-target (SLO-aware) one, in one run.

  python benchmarks/slo.py [--model dlrm] [--bound-ms 10] [--rows 1,32] [--seconds 5]
                           [--steps 6] [--trials 4] [--repeat 1] [--out DIR]
                           [--client native|native-process|http|python]
                           [--server-cpus LIST] [--harness-cpus LIST]

For each batcher (a server started on a one-model copy of the demo repository: `fixed` is the
default queue without a time bound, `slo` adds `latency_slo_ms` = the bound in config.json)
and each request size:
1. closed-loop saturation: the same client keeps `--concurrency` requests in flight (no
   LoadGen; the best over the list), requests/s. The client (`--client`): `native`, the C++
   gRPC client as an extension in this process (benchmarks/native_sut.cc: LoadGen's issue
   thread sends, one C++ thread completes; default when it builds), `native-process`, the C++
   gRPC load generator as a child process (ids and answers over pipes: two more thread wake-ups
   per query), `http`, the C++ HTTP one (KServe v2 binary tensors, one epoll thread, the same
   pipes), or `python`, a grpc.aio client (~100 us of Python per query, taken from the 2 cores
   the server runs on);
2. LoadGen's Server scenario (Poisson arrivals) at a target QPS, searched by bisection for the
   highest QPS that is VALID: LoadGen's own verdict at the p99 bound AND at most 1% of queries
   late or failed (a shed request counts as a miss: shedding cannot buy a valid run). A QPS
   that fails is tried once more (`--tries`): noise on a shared machine only ever adds latency.
   LoadGen runs with `server_coalesce_queries`, as MLPerf submissions may: queries already due
   when its issue thread wakes go to the SUT in one call, each still timed from its own
   scheduled arrival, so the harness spends less of the shared cores per query.
   Both servers stay up and the two searches run in lockstep, probe by probe, so a drift of
   the host's speed falls on both batchers alike; each best VALID QPS is then run again, 3%
   lower each time until VALID (the table's "VALID again at": a search ends at the edge, where
   one run passes or fails on noise).
3. interleaved trials (`--trials`, benchmarks/slo_trials.py): rounds of both batchers' closed
   loops and LoadGen runs at a common grid of loads around the two edges, the order alternating;
   each batcher's edge is the load a logistic fit of all its verdicts passes half the time, over
   the median saturation of the rounds, and a bootstrap of the trials says how often the
   latency-target queue's edge comes out higher.
Prints the tables (best VALID QPS / closed-loop saturation) and the p99-vs-offered-load curves,
writes slo.png, slo_trials.png (with --trials) and slo.json to --out. A default run (DLRM, both
sizes, 4 trials) takes about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.http_serving import scratch_repository  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402
from benchmarks.native_http_loadgen import http_request  # noqa: E402
from benchmarks.serving import make_inputs, start_server, start_server_http  # noqa: E402
from benchmarks import slo_trials  # noqa: E402
from benchmarks.slo_sut import CpuMeter, GrpcSut, InProcessSut, NativeSut, loadgen_run  # noqa: E402

BATCHERS = ("fixed", "slo")


def say(msg: str) -> None:
  print(f"[slo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def server_for(repo: pathlib.Path, model: str, batcher: str, bound_ms: float, http: bool):
  """A server over a one-model copy of `repo`, configured for `batcher`: (process, the address
  the client uses: gRPC's, or HTTP's with `http`)."""
  scratch = scratch_repository(repo, model)
  cfg = {"latency_slo_ms": bound_ms} if batcher == "slo" else {"max_queue_wait_ms": 0}
  (scratch / model / "config.json").write_text(json.dumps(cfg))
  if http:
    proc, _, address = start_server_http(scratch, [])
  else:
    proc, address, _ = start_server(scratch, [])
  return proc, address


def pin(pid: int, cpus: set[int] | None) -> None:
  """Every thread of `pid` to `cpus` (threads it starts later inherit it); None: as it is."""
  if cpus:
    for tid in os.listdir(f"/proc/{pid}/task"):
      os.sched_setaffinity(int(tid), cpus)


def cpu_list(text: str) -> set[int]:
  """'0,1' or '2-7' or '0,4-5' as a set of CPU numbers."""
  out: set[int] = set()
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    out.update(range(int(lo), int(hi or lo) + 1))
  return out


class Bisection:
  """One batcher's search for the highest VALID target QPS in (0, 1.1 x saturation]."""

  def __init__(self, sat_qps: float):
    self.lo, self.hi, self.best, self.qps = 0.0, 1.1 * sat_qps, 0.0, 0.6 * sat_qps
    self.runs: list[dict] = []

  def probe(self, sut, meter: CpuMeter, args: argparse.Namespace, outdir: pathlib.Path,
            label: str) -> None:
    """Runs LoadGen at the current QPS (up to `--tries` times until VALID), then halves the
    interval."""
    for t in range(args.tries):
      r = loadgen_run(sut, self.qps, args.bound_ms, args.seconds, outdir / f"{label}-{t}", meter)
      self.runs.append(r)
      if r["valid"]:
        break
    say(f"  {label}: {self.qps:8.0f} QPS -> LoadGen p99 {r['loadgen_p99_ms']:7.2f} ms, late or"
        f" failed {r['missed_share'] * 100:5.2f}% (failed {r['failed']}), LoadGen"
        f" {r['loadgen']} (early stopping {r['early_stopping']}): "
        + ("VALID" if r["valid"] else "INVALID") + "; CPU µs/query " + cpu_text(r["cpu_us"]))
    if r["valid"]:
      self.best, self.lo = max(self.best, self.qps), self.qps
    else:
      self.hi = self.qps
    self.qps = (self.lo + self.hi) / 2


def cpu_text(cpu: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())


def held_qps(sut, meter: CpuMeter, args: argparse.Namespace, outdir: pathlib.Path,
             best: float) -> tuple[float, list[dict]]:
  """The best VALID QPS run once more; while INVALID, 3% lower, up to `--confirm-steps` times:
  (the first QPS VALID again, or 0; the runs). A search ends at the edge, where a run passes
  or fails on noise: this is the load the batcher held twice."""
  runs, qps = [], best
  for _ in range(args.confirm_steps if best > 0 else 0):
    runs.append(loadgen_run(sut, qps, args.bound_ms, args.seconds, outdir, meter))
    if runs[-1]["valid"]:
      return qps, runs
    qps *= 0.97
  return 0.0, runs


def measure_size(suts: dict, meters: dict, args: argparse.Namespace, rows: int) -> dict:
  """Both batchers at one request size, interleaved so the host's drift falls on both alike:
  closed-loop saturation (best of two alternating rounds each), then the bisections in
  lockstep, then each best VALID QPS run again (`held_qps`), then `--trials` rounds of both at
  a common grid of loads around the two edges (benchmarks/slo_trials.py)."""
  for sut in suts.values():
    sut.closed_loop(args.concurrency[0], 1.0)  # warm the connection and the batcher
  sat, sat_cpu = {b: 0.0 for b in suts}, {b: {} for b in suts}
  sat_c = {b: args.concurrency[0] for b in suts}
  for _ in range(2):
    for b, sut in suts.items():
      for c in args.concurrency:  # a light model saturates only with many requests in flight
        before = meters[b].read()
        rate = sut.closed_loop(c, args.seconds / 2)
        if rate > sat[b]:
          sat[b], sat_c[b] = rate, c
          sat_cpu[b] = CpuMeter.per_query(before, meters[b].read(), len(sut.records))
      say(f"{b}, {rows}-row: closed-loop saturation {sat[b]:.0f} requests/s; CPU µs/query "
          + cpu_text(sat_cpu[b]))
  searches = {b: Bisection(sat[b]) for b in suts}
  outdir = args.out / "loadgen"
  for step in range(args.steps):
    for b, sut in suts.items():
      searches[b].probe(sut, meters[b], args, outdir, f"{b}-{rows}row-{step}")
  out = {}
  for b, sut in suts.items():
    best = searches[b].best
    held, again = held_qps(sut, meters[b], args, outdir / f"{b}-{rows}row-confirm", best)
    say(f"  {b}-{rows}row: best VALID {best:.0f} QPS; VALID again at {held:.0f} QPS")
    out[b] = {"saturation_qps": sat[b], "saturation_cpu_us": sat_cpu[b],
              "best_valid_qps": best, "held_qps": held, "runs": searches[b].runs + again}
  loads = slo_trials.grid({b: searches[b].best for b in suts}, args.grid_points)
  if args.trials and not loads:
    say(f"{rows}-row: no trials: neither search found a VALID load")
  elif args.trials:
    say(f"{rows}-row: {args.trials} interleaved trials at " + ", ".join(f"{q:.0f}" for q in loads)
        + " QPS")
    trials = slo_trials.run_trials(suts, meters, args, rows, sat_c, loads, outdir, say)
    for b in suts:
      out[b]["trials"] = trials[b]
  return out


def measure(args: argparse.Namespace, repo: pathlib.Path) -> dict:
  """Saturation and the LoadGen searches for every request size (`--repeat` times each: one
  result per repeat), against one server per batcher (both up throughout; only one is loaded at
  a time)."""
  from bundle import list_versions, read_manifest

  http = args.client == "http"
  servers = {b: server_for(repo, args.model, b, args.bound_ms, http) for b in BATCHERS}
  for proc, _ in servers.values():  # cores apart from LoadGen's: the harness off their cores
    pin(proc.pid, args.server_cpus)
  pin(os.getpid(), args.harness_cpus)
  results: dict = {b: {} for b in BATCHERS}
  try:
    bundle = repo / args.model / str(list_versions(repo / args.model)[-1])
    signature = next(iter(read_manifest(bundle).signatures.values())).inputs
    client = {"python": GrpcSut, "native": InProcessSut}.get(args.client, NativeSut)
    for rows in args.rows:
      inputs = make_inputs(signature, rows, np.random.default_rng(0))
      payload = (http_request(args.model, inputs) if http else build_request(args.model, inputs))
      with contextlib.ExitStack() as stack:
        suts = {b: stack.enter_context(client(servers[b][1], payload)) for b in BATCHERS}
        meters = {b: CpuMeter(suts[b], servers[b][0].pid) for b in BATCHERS}
        for rep in range(args.repeat):
          if args.repeat > 1:
            say(f"{rows}-row requests: repeat {rep + 1} of {args.repeat}")
          for b, res in measure_size(suts, meters, args, rows).items():
            results[b].setdefault(rows, []).append(res)
  finally:
    for proc, _ in servers.values():
      proc.terminate()
      proc.wait(30)
  return results


def table(results: dict, args: argparse.Namespace) -> str:
  """A row per (size, repeat, batcher), ratios against the repeat's best saturation; with
  repeats, a median row per (size, batcher) as well."""
  rows = []
  for size in args.rows:
    ratios: dict = {b: ([], []) for b in BATCHERS}
    for rep in range(len(results[BATCHERS[0]][size])):
      one = {b: results[b][size][rep] for b in BATCHERS}
      top = max(r["saturation_qps"] for r in one.values())
      for b, r in one.items():
        best, held, sat = r["best_valid_qps"], r["held_qps"], r["saturation_qps"]
        ratios[b][0].append(best / top)
        ratios[b][1].append(held / top)
        rows.append((f"{size}-row", rep + 1, b, f"{sat:.0f}", f"{best:.0f}", f"{best / sat:.2f}",
                     f"{best / top:.2f}", f"{held:.0f}", f"{held / top:.2f}"))
    if args.repeat > 1:
      for b in BATCHERS:
        rows.append((f"{size}-row", "median", b, "", "", "", f"{np.median(ratios[b][0]):.2f}",
                     "", f"{np.median(ratios[b][1]):.2f}"))
  return format_table(["requests", "repeat", "batcher", "closed-loop req/s",
                       f"best VALID QPS (p99 <= {args.bound_ms:g} ms)", "/ own saturation",
                       "/ best saturation", "VALID again at", "/ best saturation"], rows)


def plot(results: dict, args: argparse.Namespace, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(args.rows), figsize=(6 * len(args.rows), 4.5), squeeze=False)
  for ax, size in zip(axes[0], args.rows):
    for b, style in zip(BATCHERS, ("o", "s")):  # points, not lines: a QPS may be run twice
      reps = results[b][size]  # every repeat's runs on one curve
      runs = sorted((r for rep in reps for r in rep["runs"]), key=lambda r: r["target_qps"])
      best = np.median([rep["best_valid_qps"] for rep in reps])
      ax.plot([r["target_qps"] for r in runs], [r["p99_ms"] for r in runs], style, alpha=0.7,
              label=f"{b} (best VALID {best:.0f} QPS" + (", median)" if len(reps) > 1 else ")"))
    ax.axhline(args.bound_ms, color="gray", lw=1, ls=":")
    ax.set(title=f"{args.model}, {size}-row requests", xlabel="offered QPS (Poisson)",
           ylabel="LoadGen p99, ms (over 1% shed: top of the chart)", yscale="log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="dlrm", help="demo model to serve (default dlrm)")
  p.add_argument("--repository", type=pathlib.Path, default=None,
                 help="model repository (default: the demo repository, built if missing)")
  p.add_argument("--bound-ms", type=float, default=10.0, help="p99 latency bound (default 10)")
  p.add_argument("--rows", default="1,32", help="request sizes, comma-separated")
  p.add_argument("--seconds", type=float, default=5.0, help="seconds per LoadGen run")
  p.add_argument("--steps", type=int, default=6, help="bisection steps")
  p.add_argument("--tries", type=int, default=2,
                 help="LoadGen runs at a QPS before it counts as INVALID")
  p.add_argument("--repeat", type=int, default=1,
                 help="whole measurements (saturation, search, re-runs) per request size; with"
                      " more than one the table adds each batcher's median ratios (the 1-row"
                      " ratio moved 0.64-0.78 between single runs minutes apart on 2 cores)")
  p.add_argument("--confirm-steps", type=int, default=3,
                 help="re-runs of the best VALID QPS, each 3%% lower than the last, until one is"
                      " VALID (the table's \"VALID again at\")")
  p.add_argument("--trials", type=int, default=4,
                 help="after the searches, rounds of both batchers at a common grid of loads"
                      " around their edges, interleaved; the edge is then the load a logistic fit"
                      " of every verdict passes half the time (0: searches only)")
  p.add_argument("--grid-points", type=int, default=5,
                 help="loads in the trials' grid, from 0.85x the lower best VALID QPS to 1.08x"
                      " the higher")
  p.add_argument("--concurrency", default="64,256", type=lambda v: [int(c) for c in v.split(",")],
                 help="requests in flight for the closed-loop saturation, comma-separated: the"
                      " best rate over them (light models with 32-row requests reach theirs only"
                      " at ~256: ctr_light 18.0k at 64, 23.2k req/s at 256)")
  p.add_argument("--client", choices=("native", "native-process", "http", "python"),
                 default=None,
                 help="the SUT's client: native (C++ gRPC in this process, default when it"
                      " builds), native-process (the same in a child process, over pipes), http"
                      " (C++ HTTP/1.1, KServe v2 binary tensors, against the server's HTTP port;"
                      " a child process) or python (grpc.aio)")
  p.add_argument("--server-cpus", type=cpu_list, default=None, metavar="LIST",
                 help="pin both servers to these CPUs (e.g. 0,1); default: not pinned")
  p.add_argument("--harness-cpus", type=cpu_list, default=None, metavar="LIST",
                 help="pin LoadGen and the client to these CPUs (e.g. 2-7), so the harness"
                      " does not share the servers' cores; default: not pinned")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "slo")
  args = p.parse_args(argv)
  args.rows = [int(r) for r in args.rows.split(",") if r.strip()]
  if args.client is None:
    from benchmarks import native_sut
    module, why = native_sut.available()
    args.client = "native" if module else "python"
    if not module:
      say(f"the C++ client does not build ({why.splitlines()[0]}); using the grpc.aio client")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  results = measure(args, repo)
  print(table(results, args))
  trials = slo_trials.table(results, args.rows, args.bound_ms)
  if trials:
    print("\nInterleaved trials (the edge: a logistic fit of every verdict, VALID half the time):")
    print(trials)
    slo_trials.plot(results, args.rows, args.model, args.out / "slo_trials.png")
  (args.out / "slo.json").write_text(json.dumps(results, indent=1, default=str))
  plot(results, args, args.out / "slo.png")
  say(f"wrote {args.out / 'slo.png'}" + (" and slo_trials.png" if trials else "")
      + f" and {args.out / 'slo.json'}")


if __name__ == "__main__":
  main()
