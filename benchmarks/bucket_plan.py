"""Bucket plans learned from traffic against the default power-of-two plans, on three traffic
mixes: padded work / real work at the same number of buckets, and the fewest learned buckets
that waste no more than the default.

  python benchmarks/bucket_plan.py [--requests 200000] [--seed 0] [--out DIR]

Mixes (generated; no data downloaded): ads ranking requests (candidates per request, lognormal
around 150, 10..1000, default buckets 8..1024), query lengths (tokens, lognormal around 6,
1..64, default 8..64) and a bimodal mix (80% single rows, 20% around 200 rows, default 1..256).
Work is counted in rows (tokens): a padded row costs what a real one does. Prints the table,
writes bucket_plan.png and bucket_plan.json to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import format_table  # noqa: E402
from serving.batching.bucket_plan import evaluate, plan_buckets  # noqa: E402


def mixes(n: int, seed: int) -> dict[str, tuple[collections.Counter, tuple[int, ...]]]:
  """name -> (size counts, default power-of-two buckets)."""
  rng = np.random.default_rng(seed)
  ads = np.clip(np.round(rng.lognormal(np.log(150), 0.6, n)), 10, 1000).astype(int)
  queries = np.clip(np.round(rng.lognormal(np.log(6), 0.5, n)), 1, 64).astype(int)
  bimodal = np.where(rng.random(n) < 0.8, 1,
                     np.clip(np.round(rng.normal(200, 30, n)), 2, 256)).astype(int)
  p2 = lambda lo, hi: tuple(2 ** i for i in range(int(np.log2(lo)), int(np.log2(hi)) + 1))
  return {"ads ranking (candidates)": (collections.Counter(ads.tolist()), p2(8, 1024)),
          "query lengths (tokens)": (collections.Counter(queries.tolist()), p2(8, 64)),
          "bimodal (rows)": (collections.Counter(bimodal.tolist()), p2(1, 256))}


def compare(counts: collections.Counter, default: tuple[int, ...]) -> dict:
  base = evaluate(counts, default)
  plans = [plan_buckets(counts, k, largest=default[-1]) for k in range(1, len(default) + 1)]
  same = plans[-1]
  fewest = next(p for p in plans if p.waste <= base.waste)
  return {"default": base, "learned": same, "fewest": fewest,
          "waste_ratio": same.waste / base.waste if base.waste else 0.0}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--requests", type=int, default=200_000, help="requests per mix")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path,
                 default=pathlib.Path(tempfile.gettempdir()) / "bucket_plan")
  args = p.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  results = {name: compare(c, d) for name, (c, d) in mixes(args.requests, args.seed).items()}
  rows = []
  for name, r in results.items():
    d, l, f = r["default"], r["learned"], r["fewest"]
    rows.append((name, len(d.buckets), f"{d.padded / d.real:.3f}", f"{l.padded / l.real:.3f}",
                 f"{r['waste_ratio']:.2f}", len(f.buckets), " ".join(map(str, l.buckets))))
  print(format_table(["mix", "buckets", "padded/real default", "padded/real learned",
                      "learned waste / default waste", "fewest learned buckets as good",
                      "learned buckets"], rows))
  for name, r in results.items():
    ok = r["waste_ratio"] <= 0.5 or len(r["fewest"].buckets) < len(r["default"].buckets)
    print(f"{name}: {'meets' if ok else 'misses'} the target (half the waste, or as little with"
          " fewer buckets)")
  (args.out / "bucket_plan.json").write_text(json.dumps(
      {n: {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in r.items()}
       for n, r in results.items()}, indent=1, default=list))
  _plot(results, args.out / "bucket_plan.png")
  print(f"wrote {args.out / 'bucket_plan.png'} and {args.out / 'bucket_plan.json'}")


def _plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, (key, label) in enumerate((("default", "power of two"), ("learned", "learned, same k"),
                                    ("fewest", "learned, fewest as good"))):
    ax.bar(x + (i - 1) * 0.27, [results[n][key].waste * 100 for n in names], 0.27,
           label=label)
  ax.set_xticks(x, [n.split(" (")[0] for n in names])
  ax.set(ylabel="padding, % of real work", title="bucket plans learned from traffic")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
