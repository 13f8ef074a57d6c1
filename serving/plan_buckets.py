"""`xlaserve plan-buckets`: the bucket set a model's recorded traffic asks for.

Reads the `xlaserve_request_rows` histogram of a model (`xlaserve_request_seq_len` of a
sequence model with `--sizes seq`) from a running server's Prometheus
endpoint (or a saved copy of its text), and prints the plan that minimises padded rows per
request under a budget of buckets (serving/batching/bucket_plan.py), against the current one.
"""

from __future__ import annotations

import argparse
import re
import urllib.request
from typing import Mapping

from serving.batching.bucket_plan import evaluate, plan_buckets

_SAMPLE = re.compile(r'^(?P<name>xlaserve_request_\w+)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$')
METRIC = {"rows": "xlaserve_request_rows", "seq": "xlaserve_request_seq_len"}


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      "plan-buckets", help="the batch buckets a model's recorded traffic asks for",
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--metrics", required=True,
                 help="the server's metrics URL (http://127.0.0.1:8002/metrics) or a file"
                 " holding a saved scrape")
  p.add_argument("--model", required=True, help="model name")
  p.add_argument("--version", default=None, help="model version (default: all summed)")
  p.add_argument("--buckets", type=int, default=None,
                 help="how many buckets the plan may compile (default: as many as today)")
  p.add_argument("--current", required=True,
                 help="today's buckets, comma-separated (ModelConfig's preferred_batch_size,"
                 " or the sequence buckets with --sizes seq)")
  p.add_argument("--sizes", choices=sorted(METRIC), default="rows",
                 help="plan batch buckets from request rows, or sequence buckets from the"
                 " sequence lengths of a sequence model")


def size_counts(text: str, model: str, version: str | None = None,
                metric: str = METRIC["rows"]) -> dict[int, float]:
  """Requests per size bin (its upper bound) of `model` from Prometheus text (cumulative
  histogram buckets, summed over versions unless one is named)."""
  cumulative: dict[float, float] = {}
  for line in text.splitlines():
    m = _SAMPLE.match(line.strip())
    if not m or m.group("name") != metric:
      continue
    labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
    if labels.get("model") != model or (version is not None and labels.get("version") != version):
      continue
    le = float(labels["le"])
    cumulative[le] = cumulative.get(le, 0.0) + float(m.group("value"))
  counts, prev = {}, 0.0
  for le in sorted(cumulative):
    if le != float("inf") and cumulative[le] > prev:
      counts[int(le)] = cumulative[le] - prev
    prev = cumulative[le]
  return counts


def read(source: str) -> str:
  if source.startswith(("http://", "https://")):
    with urllib.request.urlopen(source, timeout=10) as r:  # noqa: S310 (operator's own URL)
      return r.read().decode()
  with open(source) as f:
    return f.read()


def report(counts: Mapping[int, float], current: list[int], k: int,
           field: str = "batch_buckets") -> str:
  """The current plan and the learned one, padded rows per request each."""
  now = evaluate(counts, current)
  new = plan_buckets(counts, k, largest=current[-1])
  total = sum(counts.values())
  return "\n".join([
      f"{total:.0f} requests recorded, {now.real:.2f} rows each on average",
      f"current  {len(now.buckets):>2} buckets {' '.join(map(str, now.buckets))}:"
      f" padded/real {now.padded / now.real:.3f}",
      f"learned  {len(new.buckets):>2} buckets {' '.join(map(str, new.buckets))}:"
      f" padded/real {new.padded / new.real:.3f}",
      f"export with ExportConfig({field}=(" + ", ".join(map(str, new.buckets)) + ",))"])


def main(args: argparse.Namespace) -> int:
  current = sorted(int(x) for x in args.current.split(",") if x.strip())
  counts = size_counts(read(args.metrics), args.model, args.version, METRIC[args.sizes])
  if not counts:
    print(f"no {METRIC[args.sizes]} recorded for model {args.model!r}: send it traffic first")
    return 1
  if max(counts) > current[-1]:  # split requests: the largest bucket still bounds a batch
    capped: dict[int, float] = {}
    for n, w in counts.items():
      capped[min(n, current[-1])] = capped.get(min(n, current[-1]), 0.0) + w
    counts = capped
  print(report(counts, current, args.buckets or len(current),
               "seq_buckets" if args.sizes == "seq" else "batch_buckets"))
  return 0
