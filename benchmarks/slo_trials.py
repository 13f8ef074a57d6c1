"""Interleaved trials for benchmarks/slo.py: both batchers at a common grid of loads, many times.

A bisection ends at the edge, where one LoadGen run passes or fails on the host's noise. Here
each round measures both servers' closed-loop saturation, then runs LoadGen at every load of
the grid for both batchers, alternating which goes first, so a drift of the host's speed falls
on both alike. Every verdict feeds a logistic fit (benchmarks/edge_fit.py): the edge is the load
VALID half the time, and the bootstrap says how sure "the latency-target queue holds more" is.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Callable

import numpy as np

from benchmarks.edge_fit import bootstrap_gap, fit_edge
from benchmarks.loadgen import format_table
from benchmarks.slo_sut import loadgen_run


def grid(bests: dict[str, float], points: int) -> list[float]:
  """Loads both batchers run at: `points` evenly from 0.85x the lower bisection edge to 1.08x
  the higher (a bisection's best is often a lucky run, so the span reaches further below it;
  only a batcher's own edge when the other found none)."""
  found = [b for b in bests.values() if b > 0]
  if not found:
    return []
  return [float(round(q, -1)) for q in np.linspace(0.85 * min(found), 1.08 * max(found), points)]


def widened(loads: list[float], runs: dict[str, list[dict]]) -> list[float]:
  """The grid for the next round: one step (the grid's mean spacing) above the top load when
  some batcher passed it in at least half its runs there, and one below the bottom load when
  some batcher failed it in at least half, so that every edge ends up inside the loads tried
  however slow the minute the bisection ran in."""
  step = (loads[-1] - loads[0]) / max(len(loads) - 1, 1)

  def share(load: float) -> list[float]:
    return [float(np.mean(v)) for v in ([r["valid"] for r in rs if r["target_qps"] == load]
                                        for rs in runs.values()) if v]

  out = list(loads)
  if any(s >= 0.5 for s in share(loads[-1])):
    out.append(float(round(loads[-1] + step, -1)))
  if loads[0] - step > 0 and any(s <= 0.5 for s in share(loads[0])):
    out.insert(0, float(round(loads[0] - step, -1)))
  return out


def run_trials(suts: dict, meters: dict, args: argparse.Namespace, rows: int,
               concurrency: dict[str, int], loads: list[float], outdir: pathlib.Path,
               say: Callable[[str], None]) -> dict:
  """`args.trials` rounds: closed-loop saturation of each batcher (at its best concurrency),
  then every load for both batchers; the order of batchers alternates per run and the loads
  run up in one round and down in the next; after each round the grid may grow by a load at
  either end (`widened`). Per batcher: {"saturation": [req/s per round],
  "runs": [{target_qps, valid, p99_ms, trial}]}."""
  names = list(suts)
  out = {b: {"saturation": [], "runs": []} for b in names}
  for t in range(args.trials):
    for b in (names if t % 2 == 0 else names[::-1]):
      out[b]["saturation"].append(suts[b].closed_loop(concurrency[b], args.seconds / 2))
    if t > 0:
      loads = widened(loads, {b: out[b]["runs"] for b in names})
    for i, load in enumerate(loads if t % 2 == 0 else loads[::-1]):
      for b in (names if (t + i) % 2 == 0 else names[::-1]):
        r = loadgen_run(suts[b], load, args.bound_ms, args.seconds,
                        outdir / f"{b}-{rows}row-trial{t}-{i}", meters[b])
        out[b]["runs"].append({"target_qps": load, "valid": bool(r["valid"]),
                               "p99_ms": r["p99_ms"], "trial": t,
                               "cpu_us": sum(r.get("cpu_us", {}).values()) or float("nan")})
    say(f"  {rows}-row trial {t + 1}/{args.trials}: saturation "
        + ", ".join(f"{b} {out[b]['saturation'][-1]:.0f}" for b in names) + "; VALID at "
        + "; ".join(f"{b} " + (" ".join(f"{r['target_qps'] / 1e3:.1f}k" for r in out[b]["runs"]
                                         if r["trial"] == t and r["valid"]) or "none")
                    for b in names))
  return out


def cpu_ceiling(runs: list[dict], edge_qps: float, cores: int, span: float = 0.12) -> float:
  """The load every core could carry at the CPU a query cost near the edge (median over the
  runs within `span` of it, else over all runs; server, client and LoadGen together): cores /
  cost. An open loop pays wake-ups a closed loop does not, so this bounds its edge on a host
  where the harness shares the cores; nan without CPU figures."""
  near = [r for r in runs if abs(r["target_qps"] - edge_qps) <= span * edge_qps]
  # A run without CPU figures has nan, which fails `> 0` and drops out.
  costs = [c for r in (near or runs) if (c := r.get("cpu_us", float("nan"))) > 0]
  return cores * 1e6 / float(np.median(costs)) if costs else float("nan")


def summarize(trials: dict, cores: int | None = None) -> dict:
  """Per batcher: the fitted edge (its status `extrapolated` when it lies outside the loads
  tried), the saturation (median over rounds of the round's best batcher) and their ratio; and
  the gap last - first batcher with its bootstrap spread; each batcher's `ceiling` is
  `cpu_ceiling` over the saturation (`cores`: this machine's)."""
  names = list(trials)
  rounds = min(len(trials[b]["saturation"]) for b in names)
  sat = float(np.median([max(trials[b]["saturation"][t] for b in names) for t in range(rounds)]))
  out: dict = {"saturation": sat}
  for b in names:
    runs = trials[b]["runs"]
    edge = fit_edge([r["target_qps"] for r in runs], [r["valid"] for r in runs])
    loads = [r["target_qps"] for r in runs]
    status = edge.status  # a fit beyond the loads tried is an extrapolation: say so
    if status == "fit" and not min(loads) <= edge.qps <= max(loads):
      status = "extrapolated"
    ceiling = cpu_ceiling(runs, edge.qps, cores or os.cpu_count() or 1)
    out[b] = {"edge_qps": edge.qps, "edge_status": status,
              "ratio": edge.qps / sat if sat else 0.0,
              "own_saturation": float(np.median(trials[b]["saturation"])),
              "ceiling": ceiling / sat if sat else float("nan")}
  pairs = {b: [(r["target_qps"], r["valid"]) for r in trials[b]["runs"]] for b in names}
  out["gap"] = bootstrap_gap(pairs[names[0]], pairs[names[-1]])
  return out


_QUALIFIER = {"fit": "", "extrapolated": " (beyond the grid)", "all_valid": " (all VALID: a bound)",
              "none_valid": " (none VALID)"}


def valid_counts(runs: list[dict]) -> str:
  """'31.0k 4/4, 33.0k 2/4, ...': VALID runs of all runs, per load."""
  loads = sorted({r["target_qps"] for r in runs})
  return ", ".join(f"{q / 1e3:.1f}k {sum(r['valid'] for r in runs if r['target_qps'] == q)}/"
                   f"{sum(r['target_qps'] == q for r in runs)}" for q in loads)


def median_p99s(runs: list[dict]) -> str:
  """'3.4, 7.6, 14, ...': the median over trials of each load's p99 in ms (a run with over 1%
  of its queries shed counts as 10 s), in load order: the margin the VALID counts hide."""
  loads = sorted({r["target_qps"] for r in runs})
  return ", ".join(f"{np.median([r['p99_ms'] for r in runs if r['target_qps'] == q]):.3g}"
                   for q in loads)


def table(results: dict, sizes: list[int], bound_ms: float) -> str:
  """A row per (size, repeat, batcher) with its VALID counts, fitted edge and ratio, and a row
  per (size, repeat) with the gap between the batchers' edges."""
  names = list(results)
  rows = []
  for size in sizes:
    for rep in range(len(results[names[0]].get(size, []))):
      trials = {b: results[b][size][rep].get("trials") for b in names}
      if not all(trials.values()):
        continue
      s = summarize(trials)
      for b in names:
        e = s[b]
        rows.append((f"{size}-row", rep + 1, b, f"{s['saturation']:.0f}",
                     valid_counts(trials[b]["runs"]), median_p99s(trials[b]["runs"]),
                     f"{e['edge_qps']:.0f}" + _QUALIFIER[e["edge_status"]],
                     f"{e['ratio']:.2f}", f"{e['ceiling']:.2f}"))
      g = s["gap"]
      rows.append((f"{size}-row", rep + 1, f"{names[-1]} - {names[0]}", "", "", "",
                   f"{g['gap']:+.0f} (p10 {g['p10']:+.0f}, p90 {g['p90']:+.0f})",
                   f"higher in {g['share_b_higher'] * 100:.0f}% of draws", ""))
  if not rows:
    return ""
  return format_table(["requests", "repeat", "batcher", "closed-loop req/s (median)",
                       f"VALID runs per load (p99 <= {bound_ms:g} ms)", "median p99 ms",
                       "edge: VALID half the time", "/ saturation",
                       "CPU ceiling / saturation"], rows)


def plot(results: dict, sizes: list[int], model: str, path: pathlib.Path) -> None:
  """VALID share against load per batcher, with the fitted logistic curves and edges."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    for b, color in zip(names, ("tab:blue", "tab:orange")):
      runs = [r for rep in results[b].get(size, []) for r in (rep.get("trials") or {}).get(
          "runs", [])]
      if not runs:
        continue
      loads = np.array(sorted({r["target_qps"] for r in runs}))
      share = [np.mean([r["valid"] for r in runs if r["target_qps"] == q]) for q in loads]
      edge = fit_edge([r["target_qps"] for r in runs], [r["valid"] for r in runs])
      ax.plot(loads, share, "o", color=color, label=f"{b}: edge {edge.qps:.0f} QPS")
      if edge.status == "fit":
        xs = np.linspace(loads.min(), loads.max(), 100)
        ax.plot(xs, 1 / (1 + np.exp((xs - edge.qps) / edge.scale)), "-", color=color, alpha=0.6)
        ax.axvline(edge.qps, color=color, ls=":", lw=1)
    ax.set(title=f"{model}, {size}-row requests: interleaved trials",
           xlabel="offered QPS (Poisson, LoadGen)", ylabel="share of runs VALID",
           ylim=(-0.05, 1.05))
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
