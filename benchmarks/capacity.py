"""Capacity planning: replicas per hour for a day of traffic at a p99 target, checked by
simulating the batcher at the peak hour.

  python benchmarks/capacity.py [--profile FILE] [--requests-per-day 1e10] [--rows 100]
                                [--p99-ms 20] [--peak-to-mean 2.0] [--shape h0,...,h23]
                                [--price-per-hour 2.5] [--out DIR]

The replica profile (JSON) is what one replica was measured to do: `bucket_seconds` (seconds
per batch at each bucket, e.g. the raw ceiling of benchmarks/serving.py or the ModelStatistics
of a GPU host), `host_s_per_request` (the server's CPU per request outside the model), the
executors per replica (`instances`), and optionally `curve`: measured (offered QPS, p99 ms)
points at this request size (benchmarks/slo.py's sweep). Without --profile the shipped example
(the demo DLRM measured on 2 CPU cores) is used.

1. Per-replica capacity at the target: from the measured curve (the highest QPS whose p99 is
   within it, interpolated), else from the simulation.
2. Each hour's rate (the daily total spread by the hourly shape: a given 24-value shape, or a
   diurnal curve with the given peak-to-mean ratio) over that capacity, rounded up, plus one
   replica (N+1: a replica may fail or be rolled); accelerator-hours a day and their cost.
3. The check: the batcher simulated (benchmarks/capacity_sim.py) at the peak hour with one
   replica down, its p99 against the target; and the simulated capacity against the curve's.
Prints the plan and every disagreement, writes capacity.json and capacity.png.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.capacity_sim import Replica, capacity_at, simulate  # noqa: E402
from benchmarks.loadgen import format_table  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parent / "profiles" / "dlrm_cpu2.json"


def hourly_shape(peak_to_mean: float, shape: list[float] | None = None) -> np.ndarray:
  """24 hourly weights with mean 1: the given ones normalized, or a diurnal cosine (trough at
  4:00, peak at 16:00) scaled so its peak is `peak_to_mean`."""
  if shape is not None:
    w = np.asarray(shape, float)
    if len(w) != 24 or (w < 0).any() or w.sum() == 0:
      raise ValueError("--shape needs 24 non-negative hourly weights, not all zero")
    return w / w.mean()
  if not 1.0 <= peak_to_mean < 2.0 + 1e-9:
    raise ValueError(f"--peak-to-mean must be in [1, 2] for the diurnal curve, got {peak_to_mean}")
  return 1.0 + (peak_to_mean - 1.0) * np.cos((np.arange(24) - 16) * 2 * np.pi / 24)


def curve_capacity(curve: list[list[float]], p99_ms: float) -> float | None:
  """The highest QPS of measured (qps, p99 ms) points with p99 within `p99_ms`, interpolated
  linearly to the first point past it; None without a point within."""
  pts = sorted((float(q), float(p)) for q, p in curve)
  best = None
  for (q0, p0), (q1, p1) in zip(pts, pts[1:] + [(math.inf, math.inf)]):
    if p0 > p99_ms:
      break
    best = q0 if not math.isfinite(q1) or p1 <= p99_ms else q0 + (q1 - q0) * (p99_ms - p0) / (p1 - p0)
  return best


def plan(rate_per_hour: np.ndarray, capacity_rps: float) -> np.ndarray:
  """Replicas each hour: the hour's rate over one replica's capacity, rounded up, plus one."""
  if capacity_rps <= 0:
    raise ValueError("one replica cannot meet the target at any rate: no plan exists")
  return np.ceil(rate_per_hour / capacity_rps).astype(int) + 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--profile", type=pathlib.Path, default=EXAMPLE,
                 help="replica profile JSON (default: the demo DLRM on 2 CPU cores)")
  p.add_argument("--requests-per-day", type=float, default=1e10)
  p.add_argument("--rows", type=int, default=100, help="rows (candidates) per request")
  p.add_argument("--p99-ms", type=float, default=20.0, help="p99 latency target")
  p.add_argument("--peak-to-mean", type=float, default=1.7,
                 help="peak hour / mean hour of the diurnal curve (ignored with --shape)")
  p.add_argument("--shape", default=None, help="24 comma-separated hourly weights")
  p.add_argument("--price-per-hour", type=float, default=2.5,
                 help="cost of one replica (accelerator) hour")
  p.add_argument("--sim-seconds", type=float, default=20.0, help="simulated seconds per check")
  p.add_argument("--out", type=pathlib.Path,
                 default=pathlib.Path(tempfile.gettempdir()) / "capacity")
  p.add_argument("--write-profile", metavar="MODEL", default=None,
                 help="measure MODEL of the demo repository (its buckets back to back, one"
                 " caller) and write its profile to --profile instead of planning")
  p.add_argument("--host-us", type=float, default=100.0,
                 help="with --write-profile: the server's host CPU per request in µs (the"
                 " 'host path' column of benchmarks/serving.py)")
  args = p.parse_args(argv)
  args.shape = [float(x) for x in args.shape.split(",")] if args.shape else None
  return args


def run(args: argparse.Namespace) -> dict:
  """The plan, the simulated check and their disagreements, as a dict (printed by main)."""
  prof = json.loads(args.profile.read_text())
  replica = Replica({int(b): s for b, s in prof["bucket_seconds"].items()},
                    prof.get("host_s_per_request", 0.0), prof.get("instances", 1))
  target_s = args.p99_ms / 1e3
  sim_cap = capacity_at(replica, rows=args.rows, p99_s=target_s, seconds=args.sim_seconds,
                        latency_slo_s=target_s)
  measured = None
  if prof.get("curve") and prof.get("curve_rows") == args.rows:
    measured = curve_capacity(prof["curve"], args.p99_ms)
  cap = measured if measured is not None else sim_cap
  rates = args.requests_per_day / 86400 * hourly_shape(args.peak_to_mean, args.shape)
  replicas = plan(rates, cap)
  peak = int(np.argmax(rates))
  check = simulate(replica, rate=rates[peak] / (replicas[peak] - 1), rows=args.rows,
                   seconds=args.sim_seconds, latency_slo_s=target_s)
  disagree = []
  if check.p(99) > target_s:
    disagree.append(f"at the peak hour ({peak}:00) with one replica down the simulated p99 is"
                    f" {check.p(99) * 1e3:.1f} ms, over the {args.p99_ms:g} ms target: the"
                    " capacity figure is optimistic; plan with the simulated one")
  if measured is not None and abs(measured - sim_cap) > 0.2 * measured:
    disagree.append(f"measured capacity {measured:.0f} req/s vs simulated {sim_cap:.0f} req/s:"
                    " the simulation misses costs the measurement saw (or the reverse)")
  hours = int(replicas.sum())
  return {"capacity_rps": cap, "capacity_source": "curve" if measured is not None else "simulation",
          "simulated_capacity_rps": sim_cap, "rates_rps": rates.tolist(),
          "replicas": replicas.tolist(), "replica_hours_per_day": hours,
          "cost_per_day": hours * args.price_per_hour, "peak_hour": peak,
          "peak_check_p99_ms": check.p(99) * 1e3, "peak_check_shed": check.shed,
          "disagreements": disagree}


def write_profile(args: argparse.Namespace) -> None:
  """Measures a demo model's batch time per bucket and writes the replica profile."""
  from benchmarks.serving import raw_ceiling
  from bundle import list_versions
  from demo.repository import ensure_demo_repository

  repo = ensure_demo_repository(print)
  bundle = repo / args.write_profile / str(list_versions(repo / args.write_profile)[-1])
  raw, _ = raw_ceiling(bundle, 3.0)
  prof = {"model": args.write_profile, "machine": _machine(),
          "bucket_seconds": {str(r["bucket"]): r["ms_per_batch"] / 1e3 for r in raw},
          "host_s_per_request": args.host_us / 1e6, "instances": 1}
  args.profile.write_text(json.dumps(prof, indent=1) + "\n")
  print(f"wrote {args.profile}")


def _machine() -> str:
  import os
  import platform
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.write_profile:
    write_profile(args)
    return
  args.out.mkdir(parents=True, exist_ok=True)
  res = run(args)
  print(f"one replica at p99 <= {args.p99_ms:g} ms, {args.rows} rows/request:"
        f" {res['capacity_rps']:.0f} req/s ({res['capacity_source']}; simulated"
        f" {res['simulated_capacity_rps']:.0f})")
  print(format_table(["hour", "req/s", "replicas (N+1)"],
                     [(f"{h:02d}:00", f"{r:,.0f}", n)
                      for h, (r, n) in enumerate(zip(res["rates_rps"], res["replicas"]))]))
  print(f"{args.requests_per_day:.3g} requests/day: {res['replica_hours_per_day']:,} replica-hours"
        f" a day, {res['cost_per_day']:,.0f} at {args.price_per_hour:g}/hour; peak hour check"
        f" (one replica down): p99 {res['peak_check_p99_ms']:.1f} ms,"
        f" {res['peak_check_shed']} shed")
  for d in res["disagreements"] or ["plan and simulation agree"]:
    print(" * " + d)
  (args.out / "capacity.json").write_text(json.dumps(res, indent=1))
  _plot(res, args, args.out / "capacity.png")
  print(f"wrote {args.out / 'capacity.png'} and {args.out / 'capacity.json'}")


def _plot(res: dict, args: argparse.Namespace, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4))
  ax.bar(range(24), res["replicas"], color="tab:blue", label="replicas (N+1)")
  ax2 = ax.twinx()
  ax2.plot(range(24), res["rates_rps"], "k.-", label="requests/s")
  ax.set(xlabel="hour", ylabel="replicas",
         title=f"{args.requests_per_day:.3g} requests/day, p99 <= {args.p99_ms:g} ms:"
               f" {res['replica_hours_per_day']:,} replica-hours/day")
  ax2.set_ylabel("requests/s")
  handles = [*ax.get_legend_handles_labels()[0], *ax2.get_legend_handles_labels()[0]]
  ax.legend(handles=handles, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
