"""What tracing costs at saturation: the same server with tracing off and with `--trace-rate`
(default 0.01) exporting to an OTLP sink in this process, measured in one run.

  python benchmarks/tracing_cost.py [--repository DIR] [--model ctr_light] [--rates 0.01]
                                    [--duration 6] [--rounds 3] [--out bench_out/tracing_cost]

`xlaserve serve` (a subprocess, native front end by default) serves one model; the load
generator (benchmarks/native_loadgen.cc when it builds) keeps `--concurrency` single-row
requests in flight (closed loop): a host-bound regime, where per-request costs show most.
Configurations alternate round by round (a fresh server each time) so drift on a shared
machine hits them alike; per configuration the median round is reported: requests/s, p50 and
p99, the server process's CPU µs per request, and the spans the sink received. Prints a table,
writes tracing_cost.png and tracing_cost.json to --out. The target: at 1 % sampling, less than
3 % of throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.http_serving import free_port  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402
from benchmarks.load_generators import pick_loadgen  # noqa: E402
from benchmarks.serving import ServerCpu, make_inputs, say, start_server  # noqa: E402


class Sink:
  """An OTLP/gRPC trace receiver counting the spans exported to it (and the SERVER ones: the
  traced requests)."""

  def __init__(self):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    sink = self
    self.spans = self.requests = 0
    self._lock = threading.Lock()

    class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
      def Export(self, request, context):
        spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with sink._lock:
          sink.spans += len(spans)
          sink.requests += sum(s.kind == s.SPAN_KIND_SERVER for s in spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(), self._server)
    self.endpoint = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
    self._server.start()

  def stop(self) -> None:
    self._server.stop(0)


def _one_model_repository(repo: pathlib.Path, model: str, tmp: pathlib.Path) -> pathlib.Path:
  """A repository holding only (a copy of) `model`: a quick start."""
  out = tmp / "repo"
  shutil.copytree(repo / model, out / model)
  return out


def _round(repo: pathlib.Path, payload: bytes, args: argparse.Namespace, extra: list[str],
           sink: Sink) -> dict:
  """One server with flags `extra`, one closed-loop load phase; its figures (spans: all this
  server exported, flushed at its stop; traced: their share of the requests it answered)."""
  spans0, traced0 = sink.spans, sink.requests
  proc, addr, _ = start_server(repo, [*extra, *args.server_args.split()])
  try:
    cpu = ServerCpu(proc, addr, args.model)
    warm = args.run_load(addr, payload, rows_per_request=1, concurrency=args.concurrency,
                         processes=args.processes, duration=1.0, warmup=0.0)  # warm the paths
    before = cpu.read()
    res = args.run_load(addr, payload, rows_per_request=1, concurrency=args.concurrency,
                        processes=args.processes, duration=args.duration, warmup=0.0)
    after = cpu.read()
  finally:
    proc.terminate()  # graceful: the server flushes its spans
    proc.wait(60)
  if res.errors:
    raise RuntimeError(f"errors under load: {res.errors}")
  answered = max(warm.ok + res.ok, 1)
  return {"rps": res.rps, "p50_ms": res.pct_ms(50), "p99_ms": res.pct_ms(99),
          "cpu_us": (after[0] - before[0]) / max(res.ok, 1) * 1e6, "requests": answered,
          "spans": sink.spans - spans0, "traced": (sink.requests - traced0) / answered}


def _same_server(repo: pathlib.Path, payload: bytes, args: argparse.Namespace,
                 sink: Sink) -> dict[str, list[dict]]:
  """`--same-server`: one server with tracing on, its rate switched between load phases
  (POST /v2/admin/tracing): "off" is rate 0 there. No per-server drift between configurations."""
  from serving import http_client

  port = free_port()
  proc, addr, _ = start_server(repo, ["--otlp-endpoint", sink.endpoint, "--trace-rate", "0",
                                      "--http-port", str(port), *args.server_args.split()])
  rates = {"off": 0.0} | {f"rate {r:g}": r for r in args.rates}
  out: dict[str, list[dict]] = {name: [] for name in rates}
  try:
    cpu = ServerCpu(proc, addr, args.model)
    args.run_load(addr, payload, rows_per_request=1, concurrency=args.concurrency,
                  processes=args.processes, duration=1.0, warmup=0.0)
    for i in range(args.rounds):
      for name, rate in rates.items():
        http_client.call(f"http://127.0.0.1:{port}", "POST", "/v2/admin/tracing",
                         body=json.dumps({"rate": rate}).encode())
        before, spans0, traced0 = cpu.read(), sink.spans, sink.requests
        res = args.run_load(addr, payload, rows_per_request=1, concurrency=args.concurrency,
                            processes=args.processes, duration=args.duration, warmup=0.0)
        after = cpu.read()
        r = {"rps": res.rps, "p50_ms": res.pct_ms(50), "p99_ms": res.pct_ms(99),
             "cpu_us": (after[0] - before[0]) / max(res.ok, 1) * 1e6,
             "requests": max(res.ok, 1), "spans": sink.spans - spans0,  # exports lag a phase
             "traced": (sink.requests - traced0) / max(res.ok, 1)}
        out[name].append(r)
        say(f"round {i + 1} {name:>10}: {r['rps']:8.0f} req/s, p99 {r['p99_ms']:.2f} ms,"
            f" {r['cpu_us']:.0f} µs CPU/req (same server)")
  finally:
    proc.terminate()
    proc.wait(60)
  return out


def _median(rounds: list[dict]) -> dict:
  return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def plot(results: dict, path: pathlib.Path) -> None:
  """Requests/s and server CPU per request, per configuration (bars: median; dots: rounds)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results)
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, label in ((axes[0], "rps", "requests/s"), (axes[1], "cpu_us", "server CPU µs/request")):
    x = np.arange(len(names))
    ax.bar(x, [results[n]["median"][key] for n in names], 0.6, color=["C0", "C1", "C2", "C3"][:len(names)])
    for i, n in enumerate(names):
      ax.plot([i] * len(results[n]["rounds"]), [r[key] for r in results[n]["rounds"]], "k.")
    ax.set_xticks(x, names)
    ax.set_ylabel(label)
  base = results[names[0]]["median"]["rps"]
  fig.suptitle("tracing cost at saturation: " + ", ".join(
      f"{n}: {results[n]['median']['rps'] / base:.3f}" for n in names[1:]) + " of tracing off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  args = _parse_args()
  args.loadgen, args.run_load = pick_loadgen(args.loadgen)
  args.out.mkdir(parents=True, exist_ok=True)
  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  from bundle import list_versions, read_manifest

  bundle = repo / args.model / str(list_versions(repo / args.model)[-1])
  specs = read_manifest(bundle).signatures["serve"].inputs
  payload = build_request(args.model, make_inputs(specs, 1, np.random.default_rng(0)))
  sink = Sink()
  configs = {"off": []} | {f"rate {r:g}": ["--otlp-endpoint", sink.endpoint, "--trace-rate", str(r)]
                           for r in args.rates}
  rounds: dict[str, list[dict]] = {name: [] for name in configs}
  with tempfile.TemporaryDirectory(prefix="tracing_cost_") as tmp:
    small = _one_model_repository(repo, args.model, pathlib.Path(tmp))
    if args.same_server:
      rounds = _same_server(small, payload, args, sink)
    for i in range(0 if args.same_server else args.rounds):
      for name, extra in configs.items():
        r = _round(small, payload, args, extra, sink)
        rounds[name].append(r)
        say(f"round {i + 1} {name:>10}: {r['rps']:8.0f} req/s, p99 {r['p99_ms']:.2f} ms,"
            f" {r['cpu_us']:.0f} µs CPU/req, {r['spans']} spans, traced {r['traced']:.4f}")
  sink.stop()
  results = {n: {"rounds": rs, "median": _median(rs)} for n, rs in rounds.items()}
  base = results["off"]["median"]
  rows = []
  for n, r in results.items():
    m = r["median"]
    rows.append([n, f"{m['rps']:.0f}", f"{m['rps'] / base['rps']:.3f}", f"{m['p50_ms']:.2f}",
                 f"{m['p99_ms']:.2f}", f"{m['cpu_us']:.0f}", f"{m['cpu_us'] / base['cpu_us']:.3f}",
                 f"{m['traced']:.4f}", f"{m['spans'] / m['requests']:.3f}"])
  print(format_table(["tracing", "req/s", "vs off", "p50 ms", "p99 ms", "CPU µs/req",
                      "CPU vs off", "traced", "spans/req"], rows))
  print(f"{args.model}, 1-row requests, concurrency {args.concurrency}, {args.loadgen} load"
        f" generator, median of {args.rounds} rounds of {args.duration:g} s"
        + (" on one server (off: rate 0)" if args.same_server else ""))
  (args.out / "tracing_cost.json").write_text(json.dumps(
      {"model": args.model, "concurrency": args.concurrency, "duration_s": args.duration,
       "loadgen": args.loadgen, "results": results}, indent=1))
  plot(results, args.out / "tracing_cost.png")
  say(f"wrote {args.out / 'tracing_cost.png'} and {args.out / 'tracing_cost.json'}")


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repository", type=pathlib.Path, default=None,
                      help="model repository (default: the built-in demo repository)")
  parser.add_argument("--model", default="ctr_light", help="the model to load")
  parser.add_argument("--same-server", action="store_true",
                      help="one server, its rate switched between phases (POST"
                      " /v2/admin/tracing) instead of a fresh server per round: no drift"
                      " between servers, at the price of spans exported a phase late")
  parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                      default=[0.01], help="comma-separated --trace-rate values to compare")
  parser.add_argument("--duration", type=float, default=6.0, help="seconds per load phase")
  parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
  parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
  parser.add_argument("--processes", type=int, default=2,
                      help="load-generator processes (C++ generator: connections)")
  parser.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  parser.add_argument("--loadgen", choices=("native", "python"), default=None,
                      help="load generator; default: the C++ one when it builds")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/tracing_cost"))
  return parser.parse_args()


if __name__ == "__main__":
  main()
