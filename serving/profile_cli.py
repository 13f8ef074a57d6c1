"""`xlaserve profile`: captures a profile of a running server and prints where requests' time
goes, stage by stage (front end, queue, assembly, compute, encode: p50/p99 each), with the
device's busy fraction and whether each model looks launch-, host- or compute-bound. The server
also writes a jax.profiler trace (open it in https://ui.perfetto.dev or TensorBoard); `--out`
saves a copy here.

  xlaserve profile --url http://127.0.0.1:8000 --seconds 10 --out profile/
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys
from typing import Any

from serving import http_client
from serving.telemetry.profile import STAGES

PER = {"front_end": "request", "queue": "request", "assembly": "batch", "compute": "batch",
       "encode": "batch"}


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("profile", help="profile a running server: per-stage latency breakdown and"
                     " a jax.profiler trace", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--url", default="http://127.0.0.1:8000",
                 help="the server's HTTP address (its --http-port)")
  p.add_argument("--seconds", type=float, default=5.0,
                 help="how long to capture (send traffic meanwhile), at most 600")
  p.add_argument("--out", default=None,
                 help="folder to save the Perfetto trace (perfetto_trace.json.gz) and the"
                 " breakdown (profile.json) into")
  p.add_argument("--no-trace", action="store_true",
                 help="only the stage breakdown: no jax.profiler trace (lower overhead)")
  p.add_argument("--python-trace", action="store_true",
                 help="add Python's function tracer to the trace (every call of every thread:"
                 " slows serving while it runs, and the trace gets large)")
  p.add_argument("--json", action="store_true", help="print the raw breakdown as JSON")
  p.add_argument("--token", default=None, help="bearer token, when the server has one")


def build_args(argv: list[str]) -> argparse.Namespace:
  """The parsed flags of `xlaserve profile ARGV`."""
  parser = argparse.ArgumentParser(prog="xlaserve")
  add_parser(parser.add_subparsers(dest="command"))
  return parser.parse_args(["profile", *argv])


def table(report: dict[str, Any]) -> str:
  """The breakdown as a text table: one block per model version."""
  lines = [f"window {report['window_s']:.2f} s; device busy {report['busy_fraction']:.1%}"
           " (all models)"]
  for name, m in report["models"].items():
    lines += ["", f"{name}: {m['requests']} requests, {m['rows']} rows, {m['batches']} batches,"
              f" device busy {m['busy_fraction']:.1%}",
              f"  {'stage':<10} {'per':<8} {'count':>8} {'p50 ms':>9} {'p99 ms':>9}"
              f" {'mean ms':>9}"]
    for stage in STAGES:
      s = m["stages"][stage]
      lines.append(f"  {stage:<10} {PER[stage]:<8} {s['count']:>8} {s['p50'] * 1e3:>9.3f}"
                   f" {s['p99'] * 1e3:>9.3f} {s['mean'] * 1e3:>9.3f}")
    lines.append(f"  => {m['verdict']}")
  if not report["models"]:
    lines.append("no requests were served in the window: send traffic while profiling")
  if report.get("trace_dir"):
    lines.append(f"\ntrace on the server: {report['trace_dir']}")
  return "\n".join(lines)


def perfetto(trace_gz: bytes) -> bytes:
  """The server's Chrome-format trace as Perfetto's UI opens it (without its `metadata` key)."""
  trace = json.loads(gzip.decompress(trace_gz))
  trace.pop("metadata", None)
  return gzip.compress(json.dumps(trace).encode())


def main(args: argparse.Namespace) -> int:
  body = json.dumps({"seconds": args.seconds, "trace": not args.no_trace,
                     "python": args.python_trace}).encode()
  print(f"profiling {args.url} for {args.seconds:g} s ...", file=sys.stderr, flush=True)
  try:
    report = http_client.call_json(args.url, "POST", "/v2/admin/profile", body=body,
                                   content_type="application/json", token=args.token,
                                   timeout_s=args.seconds + 120)
    trace = (http_client.call(args.url, "GET", "/v2/admin/profile/trace", token=args.token)
             if args.out and report.get("trace_file") else None)
  except (OSError, RuntimeError, ValueError) as e:
    print(f"xlaserve profile: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=1) if args.json else table(report))
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    if trace is not None:
      (out / "perfetto_trace.json.gz").write_bytes(perfetto(trace))
    print(f"saved to {out}/", file=sys.stderr)
  return 0
