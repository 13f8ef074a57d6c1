"""HTTP/REST (KServe v2, binary tensors) against gRPC, served by one `xlaserve serve` process.

  python benchmarks/http_serving.py [--repository DIR] [--model dlrm,ctr_light] [--seconds 4]
                            [--rounds 2] [--rows 32] [--out bench_out/http]

For each model, a server serves it alone (hard-linked from the repository into a scratch
repository, so nothing else loads) with both protocols on free ports of 127.0.0.1, with its
default front ends (the native C++ ones when built: gRPC, and HTTP for binary-tensor inference;
`--server-args "--http-frontend python"` measures uvicorn on the port instead). The load
generator is Triton's own `perf_analyzer` (tritonclient==2.41.0, through
benchmarks/perf_analyzer.sh, which fetches its two libraries), `-i grpc` and `-i http` with the
same flags. Phases, each run for both protocols back to back, best of `--rounds` (noise on a
shared machine only ever slows a round down):
  1. 1-row requests at concurrency 16 (the request path's cost per request),
  2. `--rows`-row requests at concurrency 32 (saturation, as benchmarks/serving.py: rows/s).
HTTP sends binary tensor data (perf_analyzer's default for HTTP). Besides rows/s and latency,
the server process's CPU time per request (kernel counters over the run, divided by the
requests its statistics count; model compute included) is reported: it is steadier than
throughput on a machine shared with other work. The targets: HTTP 1-row at
least 4,000 rows/s on 2 cores, and HTTP at least 0.7 of gRPC at saturation. `dlrm` is the demo
CTR model (the model's compute dominates a 32-row request); `ctr_light` a light one whose batch
takes ~0.1 ms, so the host path sets the ceiling. Prints a table, writes http.png and http.json
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOCOLS = ("grpc", "http")


def say(msg: str) -> None:
  print(f"[http-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def perf_analyzer(url: str, model: str, protocol: str, rows: int, concurrency: int,
                  seconds: float, extra: Sequence[str] = ()) -> dict[str, float]:
  """rows/s and p50/p99 latency (ms) of one perf_analyzer run (`extra`: more of its flags)."""
  ms = str(int(seconds * 1000))
  cmd = ["bash", str(ROOT / "benchmarks/perf_analyzer.sh"), "-m", model, "-u", url,
         "-i", protocol, "-b", str(rows), "--concurrency-range", f"{concurrency}:{concurrency}",
         "--measurement-interval", ms, "--stability-percentage", "100", "--max-trials", "6",
         *extra]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + 10 * seconds, cwd=ROOT)
  text = out.stdout + out.stderr
  m = re.search(r"Throughput: ([\d.]+) infer/sec", text)
  if out.returncode != 0 or not m:
    raise RuntimeError(f"perf_analyzer -i {protocol} failed ({out.returncode}):\n{text}")
  lat = {q: re.search(rf"p{q} latency: (\d+) usec", text) for q in (50, 99)}
  return {"rows_per_s": float(m.group(1)),
          **{f"p{q}_ms": int(v.group(1)) / 1e3 if v else float("nan") for q, v in lat.items()}}


def scratch_repository(repo: pathlib.Path, model: str) -> pathlib.Path:
  """A repository holding only `model`, hard-linked (copied across file systems)."""
  dest = pathlib.Path(tempfile.mkdtemp(prefix="xlaserve-http-bench-"))

  def link(src: str, dst: str) -> None:
    try:
      os.link(src, dst)
    except OSError:
      shutil.copy2(src, dst)

  shutil.copytree(repo / model, dest / model, copy_function=link)
  return dest


def start_server(repo: pathlib.Path, grpc_port: int, http_port: int,
                 extra: list[str]) -> subprocess.Popen:
  """`xlaserve serve` with both protocols, returned once its models are loaded."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "serving.cli", "serve", "--model-repository", str(repo),
       "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", "-1",
       *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, PYTHONUNBUFFERED="1"))
  lines, ready = [], threading.Event()

  def pump() -> None:
    for line in proc.stdout:
      lines.append(line)
      if "try it:" in line:
        ready.set()
    ready.set()

  threading.Thread(target=pump, daemon=True).start()
  if not ready.wait(600) or proc.poll() is not None:
    raise RuntimeError("server did not start:\n" + "".join(lines))
  for line in lines:
    if "front end" in line or "listening" in line:
      say(line.strip().split("] ", 1)[-1])
  return proc


def server_counters(proc: subprocess.Popen, model: str, http_port: int) -> tuple[float, int]:
  """(the server's CPU seconds so far, requests it answered): from the kernel and from the
  model's statistics."""
  import psutil

  stats = json.load(urllib.request.urlopen(
      f"http://127.0.0.1:{http_port}/v2/models/{model}/stats", timeout=30))
  done = sum(s["inference_stats"]["success"]["count"] for s in stats["model_stats"])
  return sum(psutil.Process(proc.pid).cpu_times()[:2]), done


def measure(args: argparse.Namespace, model: str, ports: dict[str, int],
            proc: subprocess.Popen) -> dict[str, dict]:
  """{phase: {protocol: best result}} over the rounds, protocols alternating."""
  phases = {"1-row c16": (1, 16), f"{args.rows}-row c32": (args.rows, 32)}
  best: dict[str, dict] = {p: {} for p in phases}
  for r in range(args.rounds):
    for phase, (rows, concurrency) in phases.items():
      for protocol in PROTOCOLS:
        cpu0, n0 = server_counters(proc, model, ports["http"])
        res = perf_analyzer(f"127.0.0.1:{ports[protocol]}", model, protocol, rows,
                            concurrency, args.seconds)
        cpu1, n1 = server_counters(proc, model, ports["http"])
        res["cpu_us_per_request"] = (cpu1 - cpu0) / max(1, n1 - n0) * 1e6
        say(f"{model} round {r + 1} {phase:>11} {protocol:>4}: {res['rows_per_s']:9.0f} rows/s"
            f"  p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms"
            f"  server CPU {res['cpu_us_per_request']:.0f} us/request")
        old = best[phase].setdefault(protocol, res)
        if res["rows_per_s"] > old["rows_per_s"]:
          best[phase][protocol] = {**res, "cpu_us_per_request": min(
              res["cpu_us_per_request"], old["cpu_us_per_request"])}
        else:
          old["cpu_us_per_request"] = min(res["cpu_us_per_request"], old["cpu_us_per_request"])
  return best


def table(results: dict[str, dict]) -> str:
  lines = [f"{'model':>10} | {'phase':>11} | {'protocol':>8} | {'rows/s':>9} | {'p50 ms':>7} |"
           f" {'p99 ms':>7} | {'CPU us/req':>10} | http/grpc"]
  for model, best in results.items():
    for phase, by in best.items():
      ratio = by["http"]["rows_per_s"] / by["grpc"]["rows_per_s"]
      for protocol in PROTOCOLS:
        r = by[protocol]
        lines.append(f"{model:>10} | {phase:>11} | {protocol:>8} | {r['rows_per_s']:9.0f} |"
                     f" {r['p50_ms']:7.2f} | {r['p99_ms']:7.2f} |"
                     f" {r['cpu_us_per_request']:10.0f} |"
                     f" {f'{ratio:.2f}' if protocol == 'http' else ''}")
  return "\n".join(lines)


def verdict(model: str, best: dict[str, dict], rows: int) -> str:
  one, sat = best["1-row c16"]["http"]["rows_per_s"], best[f"{rows}-row c32"]
  ratio = sat["http"]["rows_per_s"] / sat["grpc"]["rows_per_s"]
  return (f"{model}: HTTP 1-row at concurrency 16: {one:.0f} rows/s (target >= 4000:"
          f" {'met' if one >= 4000 else 'MISSED'}); HTTP/gRPC at {rows} rows, concurrency 32:"
          f" {ratio:.2f} (target >= 0.7: {'met' if ratio >= 0.7 else 'MISSED'})")


def plot(results: dict[str, dict], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [(model, phase, by) for model, best in results.items() for phase, by in best.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
  for ax, (model, phase, by) in zip(axes[0], panels):
    values = [by[p]["rows_per_s"] for p in PROTOCOLS]
    ax.bar(PROTOCOLS, values, color=["tab:blue", "tab:orange"])
    ax.set_title(f"{model}: {phase} requests")
    ax.set_ylabel("rows/s")
    ax.set_ylim(0, max(values) * 1.25)
    for i, v in enumerate(values):
      ax.text(i, v, f"{v:.0f}\np99 {by[PROTOCOLS[i]]['p99_ms']:.1f} ms", ha="center",
              va="bottom", fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--repository", type=pathlib.Path, default=None,
                  help="model repository (default: the built-in demo repository, built if"
                  " missing)")
  ap.add_argument("--model", default="dlrm,ctr_light",
                  help="comma-separated models, each served alone in turn (those the repository"
                  " lacks are skipped)")
  ap.add_argument("--seconds", type=float, default=4.0, help="perf_analyzer measurement window")
  ap.add_argument("--rounds", type=int, default=2, help="rounds; the best of them is reported")
  ap.add_argument("--rows", type=int, default=32, help="rows per request at saturation")
  ap.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  ap.add_argument("--out", type=pathlib.Path, default=ROOT / "bench_out" / "http")
  return ap.parse_args()


def serve_and_measure(args: argparse.Namespace, repo: pathlib.Path, model: str) -> dict:
  """One model served alone, measured over both protocols."""
  scratch = scratch_repository(repo, model)
  ports = {"grpc": free_port(), "http": free_port()}
  say(f"serving {model} from {repo} (gRPC :{ports['grpc']}, HTTP :{ports['http']});"
      " load generator: perf_analyzer (-i grpc / -i http, binary tensors)")
  proc = start_server(scratch, ports["grpc"], ports["http"], args.server_args.split())
  try:
    return measure(args, model, ports, proc)
  finally:
    proc.terminate()
    proc.wait(60)
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
  args = parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  repo = args.repository
  if repo is None:
    sys.path.insert(0, str(ROOT))
    from demo.repository import ensure_demo_repository
    repo = ensure_demo_repository(say)
  models = [m for m in args.model.split(",") if m and (repo / m).is_dir()]
  if not models:
    raise SystemExit(f"none of {args.model} is in {repo}")
  results = {model: serve_and_measure(args, repo, model) for model in models}
  print(table(results))
  verdicts = [verdict(model, best, args.rows) for model, best in results.items()]
  print("\n".join(verdicts))
  (args.out / "http.json").write_text(json.dumps({
      "models": models, "load_generator": "perf_analyzer (tritonclient 2.41.0)",
      "seconds": args.seconds, "rounds": args.rounds, "cores": os.cpu_count(),
      "results": results, "verdicts": verdicts}, indent=1))
  plot(results, args.out / "http.png", f"HTTP (binary) vs gRPC, perf_analyzer,"
       f" {os.cpu_count()} cores")
  say(f"wrote {args.out / 'http.png'} and {args.out / 'http.json'}")


if __name__ == "__main__":
  main()
