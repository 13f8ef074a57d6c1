"""`xlaserve shadow-report`: prints a served model's canary split and shadow comparison.

It reads GET /v2/models/<model>/shadow from the server's HTTP port and prints the requests each
split version got, what happened to the shadow requests (submitted, dropped, failed, in flight)
and, per served version, how the shadow's scores differ on the same rows: means and their shift,
relative calibration (mean shadow / mean served: no labels), p50/p90/p99 and their shifts,
Spearman rank correlation and the share of requests whose top-scored row changes.

  xlaserve shadow-report --url http://127.0.0.1:8000 --model ads
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from serving import http_client


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("shadow-report", help="print a model's canary split and shadow comparison",
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--url", default="http://127.0.0.1:8000",
                 help="the server's HTTP address (its --http-port)")
  p.add_argument("--model", required=True, help="model name")
  p.add_argument("--token", default=None,
                 help="bearer token, when the server was started with one")
  p.add_argument("--json", action="store_true", help="print the server's JSON as it came")
  p.add_argument("--timeout-s", type=float, default=30.0, help="seconds to wait for the answer")


def fetch(url: str, model: str, token: str | None, timeout_s: float) -> dict[str, Any]:
  """The server's report; raises RuntimeError with its error, ValueError for a bad --url."""
  return http_client.call_json(url, "GET", f"/v2/models/{urllib.parse.quote(model)}/shadow",
                               token=token, timeout_s=timeout_s)


def _num(v: Any, fmt: str = ".6g") -> str:
  return "-" if v is None else format(v, fmt)


def render(r: dict[str, Any]) -> str:
  """The report as text tables."""
  lines = [f"model {r['model']}"]
  t = r.get("traffic")
  if t:
    total = sum(t["requests"].values())
    lines.append(f"traffic split (sticky parameter: {t['sticky_parameter'] or 'none'}):")
    lines.append(f"  {'version':>8} {'weight':>8} {'requests':>10} {'share':>8}")
    for v, w in t["versions"].items():
      n = t["requests"].get(v, 0)
      lines.append(f"  {v:>8} {_num(w):>8} {n:>10} {_num(n / total if total else None, '.3f'):>8}")
  s = r.get("shadow")
  if s:
    lines.append(f"shadow version {s['version']}: fraction {s['fraction']}, at most"
                 f" {s['queue_requests']} in flight, output {s['output'] or '(first)'}")
  for c in r.get("shadow_counts", []):
    lines.append(f"  submitted {c['submitted']}, dropped {c['dropped']}, failed {c['failed']},"
                 f" in flight {c['inflight']}"
                 + (f"; last error: {c['last_error']}" if c["last_error"] else ""))
  for c in r.get("comparisons", []):
    lines.append(f"served v{c['primary_version']} vs shadow v{c['shadow_version']}:"
                 f" {c['requests']} requests, {c['rows']} rows"
                 f" ({'exact' if c['exact_quantiles'] else 'reservoir of'}"
                 f" {c['reservoir_rows']} rows for quantiles and ranks)")
    lines.append(f"  {'':>14} {'served':>12} {'shadow':>12} {'shift':>12}")
    lines.append(f"  {'mean':>14} {_num(c['mean_primary']):>12} {_num(c['mean_shadow']):>12}"
                 f" {_num(c['mean_shift']):>12}")
    for q, v in c["quantiles"].items():
      lines.append(f"  {q:>14} {_num(v['primary']):>12} {_num(v['shadow']):>12}"
                   f" {_num(v['shift']):>12}")
    lines.append(f"  calibration ratio (mean shadow / mean served, no labels):"
                 f" {_num(c['calibration_ratio'], '.4f')}")
    lines.append(f"  Spearman rank correlation: {_num(c['spearman'], '.4f')}")
    lines.append(f"  top-ranked row changed: {_num(c['top_changed_share'], '.4f')} of"
                 f" {c['ranked_requests']} requests with more than one row")
  if not t and not s and not r.get("comparisons"):
    lines.append("no traffic split and no shadow version configured (config.json)")
  return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
  try:
    report = fetch(args.url, args.model, args.token, args.timeout_s)
  except (OSError, RuntimeError, ValueError) as e:
    print(f"xlaserve shadow-report: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=2) if args.json else render(report))
  return 0
