"""Tables, JSON and the PNG of benchmarks/serving.py: per model and front end, the raw ceiling,
every load phase with the server's CPU per request, and the headline ratios side by side."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from benchmarks.loadgen import format_table


def report(runs: dict, cpu: dict, raw: list, args: Any, model: str, saturated_at: int,
           pairs: list[float]) -> dict:
  """Prints the raw and phase tables and the headline ratios of one model, front end and
  protocol (`model`: "model/front end/protocol"); returns the summary."""
  print()
  print(f"== {model}: {args.loadgen} load generator ==")
  print(format_table(["bucket", "raw rows/s", "ms/batch", "CPU ms/batch", "raw rows/s, 2 callers"],
                     [[r["bucket"], r["rows_per_s"], r["ms_per_batch"], r["cpu_ms_per_batch"],
                       r["rows_per_s_2"]] for r in raw]))
  print()
  print(format_table(
      ["phase", "req/s", "rows/s", "p50 ms", "p99 ms", "errors", "server CPU µs/req",
       "host path CPU µs/req", "load generator CPU µs/req"],
      [[k, r.rps, r.rows_per_s, r.pct_ms(50), r.pct_ms(99), sum(r.errors.values()),
        cpu[k]["server_cpu_us"], cpu[k]["host_cpu_us"], cpu[k]["loadgen_cpu_us"]]
       for k, r in runs.items()]))
  best = max(raw, key=lambda r: r["rows_per_s"])
  best2 = max(raw, key=lambda r: r["rows_per_s_2"])
  sat, single = runs["batched_saturation"], runs["single_c16"]
  p99_70, lone_p50 = runs["batched_70pct"].pct_ms(99), runs["batched_lone"].pct_ms(50)
  summary = {
      "raw_best_rows_per_s": best["rows_per_s"], "raw_best_bucket": best["bucket"],
      "served_over_raw_paired": float(np.median(pairs)) if pairs else float("nan"),
      "paired_ratios": list(pairs),
      "served_rows_per_s": sat.rows_per_s, "served_over_raw": sat.rows_per_s / best["rows_per_s"],
      "raw_two_callers_best_rows_per_s": best2["rows_per_s_2"],
      "served_over_raw_two_callers": sat.rows_per_s / best2["rows_per_s_2"],
      "single_row_c16_rps": single.rps, "single_row_c16_p99_ms": single.pct_ms(99),
      "single_row_c16_server_cpu_us": cpu["single_c16"]["server_cpu_us"],
      "single_row_c16_host_cpu_us": cpu["single_c16"]["host_cpu_us"],
      "saturation_server_cpu_us": cpu["batched_saturation"]["server_cpu_us"],
      "saturation_loadgen_cpu_us": cpu["batched_saturation"]["loadgen_cpu_us"],
      "p99_at_70pct_ms": p99_70, "lone_p50_ms": lone_p50,
      "p99_at_70pct_over_lone_p50": p99_70 / lone_p50, "loadgen": args.loadgen,
      "saturated_at_concurrency": saturated_at,
  }
  print()
  print(f"{model}: served / raw, paired rounds (raw at bucket {best['bucket']}, then served at"
        f" {saturated_at} in flight, {len(pairs)} times): median"
        f" {summary['served_over_raw_paired']:.3f} of " + ", ".join(f"{x:.3f}" for x in pairs))
  print(f"{model}: served / raw ({args.request_rows}-row requests at saturation, reached at"
        f" {saturated_at} in flight, vs best bucket"
        f" {best['bucket']}): {summary['served_over_raw']:.3f}; with two callers at once (best"
        f" bucket {best2['bucket']}): {summary['served_over_raw_two_callers']:.3f}")
  print(f"{model}: single-row requests at concurrency 16: {single.rps:.0f} req/s, p99"
        f" {single.pct_ms(99):.2f} ms; server CPU {summary['single_row_c16_server_cpu_us']:.0f}"
        f" µs/request, host path (model excluded) {summary['single_row_c16_host_cpu_us']:.0f}"
        " µs/request")
  gen_us = summary["saturation_loadgen_cpu_us"]
  print(f"{model}: CPU per {args.request_rows}-row request at saturation: server"
        f" {summary['saturation_server_cpu_us']:.0f} µs + load generator {gen_us:.0f} µs; raw"
        f" model CPU at bucket {best['bucket']}:"
        f" {best['cpu_ms_per_batch'] * 1e3 / best['bucket'] * args.request_rows:.0f} µs of it")
  print(f"{model}: p99 at 70% load / p50 of a lone request: {p99_70:.2f} / {lone_p50:.2f} ms ="
        f" {p99_70 / lone_p50:.2f}x")
  return summary


def side_by_side(results: dict) -> None:
  """One line per (model, front end): the figures the issue tracks."""
  print()
  print(format_table(
      ["model / front end / protocol", "served rows/s", "served/raw paired",
       "served/raw unpaired", "1-row c16 req/s", "1-row p99 ms", "CPU µs/1-row req",
       "host µs/1-row req", "p99@70% / lone p50"],
      [[key, s["served_rows_per_s"], s["served_over_raw_paired"], s["served_over_raw"],
        s["single_row_c16_rps"],
        s["single_row_c16_p99_ms"], s["single_row_c16_server_cpu_us"],
        s["single_row_c16_host_cpu_us"], s["p99_at_70pct_over_lone_p50"]]
       for key, s in ((k, r["summary"]) for k, r in results.items())]))


def write_json(results: dict, args: Any, path: pathlib.Path) -> None:
  path.write_text(json.dumps({"loadgen": args.loadgen, "request_rows": args.request_rows,
                              "results": {k: {
                                  "raw": r["raw"], "summary": r["summary"], "cpu": r["cpu"],
                                  "runs": {n: {"rps": x.rps, "rows_per_s": x.rows_per_s,
                                               "p50_ms": x.pct_ms(50), "p99_ms": x.pct_ms(99),
                                               "errors": x.errors}
                                           for n, x in r["runs"].items()}}
                                  for k, r in results.items()}}, indent=1))


def plot(results: dict, args: Any, path: pathlib.Path) -> None:
  """Throughput against the raw ceiling and p50/p99 per phase, one row of panels per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(results), 2, figsize=(12, 4.5 * len(results)), squeeze=False)
  for (key, r), (a1, a2) in zip(results.items(), axes):
    raw, runs = r["raw"], r["runs"]
    a1.plot([x["bucket"] for x in raw], [x["rows_per_s"] for x in raw], "o-", label="raw jitted")
    a1.plot([x["bucket"] for x in raw], [x["rows_per_s_2"] for x in raw], "s:",
            label="raw jitted, two callers")
    a1.axhline(runs["batched_saturation"].rows_per_s, color="C1",
               label=f"served, {args.request_rows}-row requests")
    a1.axhline(runs["single_c16"].rows_per_s, color="C2", ls="--", label="served, 1-row c=16")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("bucket (rows per batch)")
    a1.set_ylabel("rows/s")
    a1.legend(fontsize=8)
    a1.set_title(f"{key}: served/raw = {r['summary']['served_over_raw_paired']:.2f} (paired)")
    names = list(runs)
    x = np.arange(len(names))
    a2.bar(x - 0.2, [runs[n].pct_ms(50) for n in names], 0.4, label="p50")
    a2.bar(x + 0.2, [runs[n].pct_ms(99) for n in names], 0.4, label="p99")
    a2.set_xticks(x, names, rotation=20, fontsize=8)
    a2.set_ylabel("ms")
    a2.legend(fontsize=8)
    a2.set_title(f"{key}: latency (1-row CPU"
                 f" {r['summary']['single_row_c16_server_cpu_us']:.0f} µs/req)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
