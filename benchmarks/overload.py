"""Overload: about 3x the load the server sustains, for a bounded time, against the real server.

  python benchmarks/overload.py [--repository DIR] [--model dlrm] [--duration 60] [--factor 3]
                                [--deadline-ms 100] [--processes 2] [--out bench_out/overload]

1. Starts `xlaserve serve` in a subprocess (the demo repository unless --repository).
2. Capacity: closed loop at saturation (--capacity-s) gives the sustained req/s.
3. Overload: an open loop at --factor x that rate for --duration seconds from --processes
   client processes on loopback, every request with a deadline (a gRPC timeout), while a
   thread samples the server's resident memory (psutil) twice a second.
4. Afterwards: the server must still be live and answer; its /metrics are read back.

The request size matters: overload is only sheddable where refusing a request costs much
less than serving it, so the default (256 rows) makes the model the bottleneck.

Pass criteria: the server stays up; the excess is shed with RESOURCE_EXHAUSTED; the p99
latency of admitted requests (answered, or failed with DEADLINE_EXCEEDED) is within the
deadline; resident memory does not grow over the run. Prints a table and writes
overload.png and overload.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import LoadResult, build_request, format_table, run_load  # noqa: E402
from benchmarks.serving import start_server  # noqa: E402


def say(msg: str) -> None:
  print(f"[overload {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class RssSampler:
  """Samples a process's resident set size every `interval_s` on a thread."""

  def __init__(self, pid: int, interval_s: float = 0.5):
    import psutil

    self.proc = psutil.Process(pid)
    self.interval_s = interval_s
    self.samples: list[tuple[float, int]] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    t0 = time.perf_counter()
    while not self._stop.is_set():
      self.samples.append((time.perf_counter() - t0, self.proc.memory_info().rss))
      self._stop.wait(self.interval_s)

  def __enter__(self) -> RssSampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


@dataclasses.dataclass(frozen=True, slots=True)
class OverloadFigures:
  """What one overload run showed (rates in requests per second, times in milliseconds)."""

  duration_s: float
  deadline_ms: float
  capacity_rps: float
  offered_rps: float
  ok: int
  shed: int
  deadline_missed: int
  other_errors: dict[str, int]
  admitted_p50_ms: float
  admitted_p99_ms: float
  rss_start_mb: float
  rss_end_mb: float
  rss_max_mb: float
  rss_samples: list[tuple[float, float]]

  @property
  def offered(self) -> int:
    return self.ok + self.shed + self.deadline_missed + sum(self.other_errors.values())

  @property
  def goodput_rps(self) -> float:
    return self.ok / self.duration_s

  @property
  def rss_growth_mb(self) -> float:
    return self.rss_end_mb - self.rss_start_mb

  def verdicts(self, *, max_growth_mb: float) -> dict[str, bool]:
    admitted = self.ok + self.deadline_missed
    return {
        "excess shed with RESOURCE_EXHAUSTED": self.shed > 0 and not self.other_errors,
        "admitted p99 within the deadline": self.admitted_p99_ms <= self.deadline_ms,
        "deadline misses below 1% of admitted": self.deadline_missed <= 0.01 * max(admitted, 1),
        f"memory growth below {max_growth_mb:g} MB": self.rss_growth_mb < max_growth_mb,
    }

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(offered=self.offered, goodput_rps=self.goodput_rps,
             rss_growth_mb=self.rss_growth_mb)
    return d


def overload(address: str, payload: bytes, *, rows: int, capacity_rps: float, factor: float,
             duration: float, deadline_s: float, server_pid: int, processes: int = 1,
             grpc_deadline: bool = True) -> OverloadFigures:
  """Offers `factor` x `capacity_rps` open-loop for `duration` s; every request carries a
  deadline: the gRPC timeout, or (grpc_deadline=False) Triton's `timeout` parameter already in
  `payload` with a lenient gRPC timeout, so each DEADLINE_EXCEEDED is the server's own."""
  rate = factor * capacity_rps
  with RssSampler(server_pid) as rss:
    res: LoadResult = run_load(address, payload, rows_per_request=rows, rate=rate,
                               processes=processes, duration=duration,
                               timeout=deadline_s if grpc_deadline else deadline_s + 10.0)
  errors = dict(res.errors)
  shed = errors.pop("RESOURCE_EXHAUSTED", 0)
  missed = errors.pop("DEADLINE_EXCEEDED", 0)
  admitted = np.concatenate([res.latencies_s,
                             res.error_latencies_s.get("DEADLINE_EXCEEDED", np.zeros(0))])
  samples = [(t, b / 2**20) for t, b in rss.samples]
  mb = np.array([m for _, m in samples])
  n = len(mb)
  start = float(np.median(mb[n // 10:max(n * 3 // 10, n // 10 + 1)]))  # after the first 10%
  end = float(np.median(mb[n * 8 // 10:]))  # the last 20%
  pct = lambda q: float(np.percentile(admitted, q) * 1e3) if len(admitted) else float("nan")
  return OverloadFigures(duration, deadline_s * 1e3, capacity_rps, rate, res.ok, shed, missed,
                         errors, pct(50), pct(99), start, end, float(mb.max()), samples)


def metric_total(text: str, name: str, **labels: str) -> float:
  """Sum of a Prometheus series over all samples carrying `labels`."""
  want = [f'{k}="{v}"' for k, v in labels.items()]
  return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if (line.startswith(name + "{") or line.startswith(name + " "))
             and all(w in line for w in want))


def server_view(text: str, deadline_s: float) -> dict[str, float]:
  """The server's own counts, with the answered requests whose time in the server (handler
  start to result ready) exceeded the largest latency-histogram bound within the deadline."""
  bounds = [float(m) for m in re.findall(
      r'xlaserve_request_latency_seconds_bucket\{[^}]*le="([0-9.]+)"', text)]
  le = max((b for b in bounds if b <= deadline_s), default=deadline_s)
  answered = metric_total(text, "xlaserve_request_latency_seconds_count")
  return {"answered": metric_total(text, "nv_inference_request_success"),
          "shed": metric_total(text, "xlaserve_requests_shed_total"),
          "deadline_exceeded_in_queue": metric_total(text, "xlaserve_deadline_exceeded_total"),
          f"answered_later_than_{le * 1e3:g}ms": answered - metric_total(
              text, "xlaserve_request_latency_seconds_bucket", le=repr(le)),
          "compiles_after_warmup": metric_total(text, "xlaserve_compiles_after_warmup")}


def main() -> None:
  args = _parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  repo, payload = _repository_and_payload(args)
  cap, fig, server_counts, up = _run_phases(repo, payload, args)
  verdicts = _report(args, cap, fig, server_counts, up)
  sys.exit(0 if all(verdicts.values()) else 1)


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repository", type=pathlib.Path, default=None,
                      help="model repository (default: the built-in demo repository)")
  parser.add_argument("--model", default="dlrm", help="model to overload")
  parser.add_argument("--request-rows", type=int, default=256,
                      help="rows per request; large enough that the model, not per-request gRPC"
                      " handling, is the bottleneck (on 2 cores 64-row requests saturate the"
                      " event loop first, and no admission policy can shed below its own cost)")
  parser.add_argument("--capacity-s", type=float, default=10.0, help="capacity phase seconds")
  parser.add_argument("--duration", type=float, default=60.0, help="overload phase seconds")
  parser.add_argument("--factor", type=float, default=3.0, help="offered load / capacity")
  parser.add_argument("--deadline-ms", type=float, default=100.0, help="per-request deadline")
  parser.add_argument("--processes", type=int, default=2, help="load-generator processes")
  parser.add_argument("--max-growth-mb", type=float, default=50.0,
                      help="resident-memory growth over the run that fails the check")
  parser.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/overload"))
  return parser.parse_args()


def _repository_and_payload(args: argparse.Namespace) -> tuple[pathlib.Path, bytes]:
  """The repository to serve (the demo one unless given) and one request to the model."""
  from benchmarks.serving import make_inputs
  from bundle import list_versions, read_manifest

  repo = args.repository
  if repo is None:
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  manifest = read_manifest(repo / args.model / str(list_versions(repo / args.model)[-1]))
  inputs = manifest.signatures["serve"].inputs
  payload = build_request(args.model, make_inputs(inputs, args.request_rows,
                                                  np.random.default_rng(0)))
  return repo, payload


def _run_phases(repo: pathlib.Path, payload: bytes, args: argparse.Namespace
                ) -> tuple[LoadResult, OverloadFigures, dict[str, float], bool]:
  """Starts the server; capacity, overload, then a check that it still answers.

  Returns (capacity result, overload figures, the server's counts for the overload phase,
  whether the server stayed up and answers).
  """
  proc, addr, metrics_url = start_server(repo, args.server_args.split(), metrics=True)
  try:
    say("warming up ...")
    run_load(addr, payload, rows_per_request=args.request_rows, concurrency=4, duration=2.0)
    say(f"capacity: closed loop at saturation for {args.capacity_s:g} s ...")
    cap = run_load(addr, payload, rows_per_request=args.request_rows, concurrency=16,
                   processes=args.processes, duration=args.capacity_s, timeout=30.0)
    say(f"sustained {cap.rps:.1f} req/s ({cap.rows_per_s:.0f} rows/s), p99 {cap.pct_ms(99):.1f}"
        f" ms; now {args.factor:g}x that for {args.duration:g} s with a"
        f" {args.deadline_ms:g} ms deadline ...")
    before = server_view(urllib.request.urlopen(metrics_url, timeout=10).read().decode(),
                         args.deadline_ms / 1e3)
    fig = overload(addr, payload, rows=args.request_rows, capacity_rps=cap.rps,
                   factor=args.factor, duration=args.duration,
                   deadline_s=args.deadline_ms / 1e3, server_pid=proc.pid,
                   processes=args.processes)
    alive = proc.poll() is None
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    after_view = server_view(text, args.deadline_ms / 1e3)
    server_counts = {k: after_view[k] - before[k] for k in before}  # the overload phase only
    after = run_load(addr, payload, rows_per_request=args.request_rows, concurrency=1,
                     duration=1.0, timeout=10.0)
    up = alive and after.ok > 0 and not after.errors
  finally:
    proc.terminate()
    proc.wait(60)
  return cap, fig, server_counts, up


def _report(args: argparse.Namespace, cap: LoadResult, fig: OverloadFigures,
            server_counts: dict[str, float], up: bool) -> dict[str, bool]:
  """Prints the tables and verdicts, writes overload.json and overload.png; returns the verdicts."""
  print()
  print(format_table(
      ["phase", "offered req/s", "ok req/s", "shed", "deadline missed", "other errors",
       "p50 ms", "p99 ms"],
      [["capacity (closed loop)", "-", cap.rps, sum(cap.errors.values()), "-", "-",
        cap.pct_ms(50), cap.pct_ms(99)],
       [f"overload {args.factor:g}x (admitted)", fig.offered_rps, fig.goodput_rps, fig.shed,
        fig.deadline_missed, sum(fig.other_errors.values()), fig.admitted_p50_ms,
        fig.admitted_p99_ms]]))
  print()
  print(format_table(["server RSS", "MB"], [["start (10-30% of run)", fig.rss_start_mb],
                                            ["end (last 20%)", fig.rss_end_mb],
                                            ["max", fig.rss_max_mb],
                                            ["growth", fig.rss_growth_mb]]))
  verdicts = {"server stayed up and answers": up, **fig.verdicts(max_growth_mb=args.max_growth_mb)}
  print()
  for what, ok in verdicts.items():
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
  print(f"the server's own counts for the overload phase (/metrics): {server_counts}")
  print(f"\n{fig.offered} requests offered in {args.duration:g} s: {fig.ok} answered"
        f" ({fig.ok / max(fig.offered, 1):.0%}), {fig.shed} shed"
        f" ({fig.shed / max(fig.offered, 1):.0%}), {fig.deadline_missed} missed their deadline;"
        f" goodput {fig.goodput_rps / cap.rps:.0%} of capacity")
  (args.out / "overload.json").write_text(json.dumps(
      {"capacity": {"rps": cap.rps, "p50_ms": cap.pct_ms(50), "p99_ms": cap.pct_ms(99),
                    "errors": cap.errors},
       "overload": fig.to_json(), "verdicts": verdicts, "server_metrics": server_counts,
       "config": {k: str(v) for k, v in vars(args).items()}}, indent=1))
  _plot(fig, cap.rps, args.out / "overload.png")
  say(f"wrote {args.out / 'overload.png'} and {args.out / 'overload.json'}")
  return verdicts


def _plot(fig: OverloadFigures, capacity: float, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  f, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
  labels = ["capacity", "offered", "answered", "shed", "deadline missed"]
  values = [capacity, fig.offered_rps, fig.goodput_rps, fig.shed / fig.duration_s,
            fig.deadline_missed / fig.duration_s]
  a1.bar(labels, values, color=["C7", "C0", "C2", "C1", "C3"])
  a1.set_ylabel("requests/s")
  a1.set_title(f"{fig.offered_rps / capacity:.1f}x overload: admitted p99"
               f" {fig.admitted_p99_ms:.0f} ms (deadline {fig.deadline_ms:.0f} ms)")
  t = [s[0] for s in fig.rss_samples]
  a2.plot(t, [s[1] for s in fig.rss_samples])
  a2.set_xlabel("seconds into the overload")
  a2.set_ylabel("server RSS (MB)")
  a2.set_title(f"resident memory: {fig.rss_growth_mb:+.1f} MB over the run")
  f.tight_layout()
  f.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
