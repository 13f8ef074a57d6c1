"""Bad inputs beside good traffic: what a stream of requests holding an out-of-range id costs
everyone else.

  python benchmarks/bad_inputs.py [--model ctr_light] [--bad-rates 100,500,2000]

A 64-bit id past 32 bits (a client sending raw hashes) is refused INVALID_ARGUMENT. Refused at
admission it costs little; refused only when its batch fails, every request sharing that batch
re-runs alone. The good load is a closed loop of --rows-row requests at --concurrency in flight;
each bad rate is an open loop of 1-row requests beside it, measured in the same run against the
good load alone. Prints a table and writes bad_inputs.png and bad_inputs.json to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.http_serving import scratch_repository  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402
from benchmarks.load_generators import pick_loadgen  # noqa: E402
from benchmarks.serving import make_inputs, say, start_server  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repository", type=pathlib.Path, default=None,
                      help="model repository (default: the built-in demo repository)")
  parser.add_argument("--model", default="ctr_light", help="a model with a 64-bit integer input")
  parser.add_argument("--rows", type=int, default=32, help="rows per good request")
  parser.add_argument("--concurrency", type=int, default=64, help="good requests in flight")
  parser.add_argument("--bad-rates", default="100,500,2000",
                      help="comma-separated bad requests per second, one phase each")
  parser.add_argument("--duration", type=float, default=4.0, help="seconds per phase")
  parser.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  parser.add_argument("--loadgen", choices=("native", "python"), default=None,
                      help="load generator (default: the C++ one when it builds)")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/bad_inputs"),
                      help="folder for bad_inputs.png and bad_inputs.json")
  return parser.parse_args(argv)


def payloads(repo: pathlib.Path, model: str, rows: int) -> tuple[bytes, bytes, str]:
  """(a good request of `rows` rows, a 1-row one with an id of 2^40, the input holding it)."""
  from bundle import list_versions, numpy_dtype, read_manifest

  bundle = repo / model / str(list_versions(repo / model)[-1])
  signature = next(iter(read_manifest(bundle).signatures.values())).inputs
  wide = [t.name for t in signature if numpy_dtype(t.dtype) == np.int64]
  if not wide:
    raise SystemExit(f"model {model!r} has no int64 input: pick one that has (ctr_light, dlrm)")
  good = build_request(model, make_inputs(signature, rows, np.random.default_rng(0)))
  bad = make_inputs(signature, 1, np.random.default_rng(1))
  bad[wide[0]].flat[0] = 2**40
  return good, build_request(model, bad), wide[0]


def _plot(rows: list[dict], alone: float, path: pathlib.Path, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot([0] + [r["bad_rate"] for r in rows], [alone] + [r["good_rps"] for r in rows], "o-")
  ax.set_xlabel("bad requests/s (an id past 32 bits)")
  ax.set_ylabel(f"good {args.rows}-row requests/s")
  ax.set_ylim(bottom=0)
  ax.set_title(f"{args.model}: good traffic beside bad inputs")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  name, run_load = pick_loadgen(args.loadgen)
  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  good, bad, wide = payloads(repo, args.model, args.rows)
  proc, addr, _ = start_server(scratch_repository(repo, args.model), args.server_args.split())
  load = dict(rows_per_request=args.rows, concurrency=args.concurrency, duration=args.duration)
  results = []
  try:
    run_load(addr, good, **{**load, "duration": 1.0})  # warm the connection and buckets
    alone = run_load(addr, good, **load)
    say(f"good load alone: {alone.rps:.0f} req/s, p99 {alone.pct_ms(99):.2f} ms")
    for rate in [float(r) for r in args.bad_rates.split(",") if r.strip()]:
      got: dict = {}
      side = threading.Thread(target=lambda: got.update(r=run_load(
          addr, bad, rows_per_request=1, concurrency=8, duration=args.duration, rate=rate)))
      side.start()
      r = run_load(addr, good, **load)
      side.join()
      b = got["r"]
      results.append({"bad_rate": rate, "good_rps": r.rps, "vs_alone": r.rps / alone.rps,
                      "good_p99_ms": r.pct_ms(99), "good_errors": sum(r.errors.values()),
                      "bad_refused": b.errors.get("INVALID_ARGUMENT", 0),
                      "bad_other": b.ok + sum(v for k, v in b.errors.items()
                                              if k != "INVALID_ARGUMENT")})
      say(f"beside {rate:.0f} bad/s: {r.rps:.0f} good req/s ({r.rps / alone.rps:.2f} of alone)")
  finally:
    proc.terminate()
    proc.wait(60)
  print(f"\n{args.model}: good {args.rows}-row requests at {args.concurrency} in flight, bad"
        f" 1-row requests with {wide} = 2^40 ({name} load generator)")
  print(format_table(
      ["bad req/s", "good req/s", "of alone", "good p99 ms", "good errors", "bad refused",
       "bad otherwise"],
      [["0", round(alone.rps), "1.00", f"{alone.pct_ms(99):.2f}",
        sum(alone.errors.values()), "-", "-"]] +
      [[f"{r['bad_rate']:.0f}", round(r["good_rps"]), f"{r['vs_alone']:.2f}",
        f"{r['good_p99_ms']:.2f}", r["good_errors"], r["bad_refused"], r["bad_other"]]
       for r in results]))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "bad_inputs.json").write_text(json.dumps(
      {"model": args.model, "rows": args.rows, "concurrency": args.concurrency,
       "alone_rps": alone.rps, "phases": results}, indent=1))
  _plot(results, alone.rps, args.out / "bad_inputs.png", args)
  say(f"wrote {args.out / 'bad_inputs.png'} and {args.out / 'bad_inputs.json'}")


if __name__ == "__main__":
  main()
