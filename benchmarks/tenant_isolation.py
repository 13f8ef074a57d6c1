"""Tenant isolation: a polite tenant's latency alone and while another tenant floods far over its
quota (refused at the door), in interleaved rounds against one `xlaserve serve`.

  python benchmarks/tenant_isolation.py [--model ctr_light] [--rounds 10] [--seconds 0.5]
                                        [--clients 16] [--quota 50] [--flooder python|native]
                                        [--flood-token tok-flood] [--out DIR]

Each round measures the polite tenant's sequential 1-row ModelInfer calls for --seconds alone,
then again while a flooder (niced: its clients would be other machines; benchmarks/flooder.py,
or with --flooder native the C++ load generator) keeps --clients calls of the flooding tenant
in flight (with --flood-token, another token: one no tenant has floods with bad credentials).
Interleaving puts drift in the machine's load on both sides. Prints the pooled and per-round p50/p99 and the flooded/solo ratios, and writes
tenant_isolation.png and .json to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.http_serving import scratch_repository  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402
from benchmarks.serving import make_inputs, say, start_server  # noqa: E402

FLOODER = pathlib.Path(__file__).with_name("flooder.py")


def tenants_file(directory: pathlib.Path, quota: int) -> pathlib.Path:
  path = directory / "tenants.json"
  path.write_text(json.dumps({"tenants": [
      {"name": "polite", "tokens": ["tok-polite"], "priority": 1},
      {"name": "flood", "tokens": ["tok-flood"], "requests_per_s": quota, "requests_burst": 10}]}))
  return path


class PythonFlood:
  """benchmarks/flooder.py (grpc.aio), one process for every round, paused between them."""

  def __init__(self, address: str, payload: bytes, clients: int, token: str):
    self.proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(FLOODER), address,
                                  token, payload.hex(), str(clients)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def _tell(self, cmd: str) -> None:
    self.proc.stdin.write(cmd + "\n")
    self.proc.stdin.flush()
    if self.proc.stdout.readline().strip() != "ack":
      raise RuntimeError("the flooder did not answer")

  def go(self, seconds: float) -> None:
    self._tell("go")

  def stop(self) -> None:
    self._tell("stop")

  def close(self) -> dict:
    self._tell("quit")
    return json.loads(self.proc.stdout.readline())

  def kill(self) -> None:
    self.proc.kill()
    self.proc.wait()


class NativeFlood:
  """benchmarks/native_loadgen.cc (C++ gRPC, a few µs of client CPU a call), one process per
  round, each flooding a little longer than the round's measurement."""

  def __init__(self, address: str, payload: bytes, clients: int, directory: pathlib.Path,
               token: str):
    from benchmarks import native_loadgen

    binary, why = native_loadgen.available()
    if binary is None:
      raise SystemExit(f"--flooder native: the C++ load generator does not build: {why}")
    request = directory / "flood_request.bin"
    request.write_bytes(payload)
    self.cmd = ["nice", "-n", "19", str(binary), "--address", address, "--request",
                str(request), "--concurrency", str(clients), "--warmup", "0",
                "--metadata", f"authorization=Bearer {token}"]
    self.proc: subprocess.Popen | None = None
    self.counts: dict[str, int] = {}

  def go(self, seconds: float) -> None:
    self.proc = subprocess.Popen([*self.cmd, "--duration", str(seconds + 0.3)],
                                 stdout=subprocess.PIPE, text=True)

  def stop(self) -> None:
    out, _ = self.proc.communicate(timeout=60)
    for line in out.splitlines():
      if line.startswith("status "):
        _, name, n = line.split()
        self.counts[name] = self.counts.get(name, 0) + int(n)

  def close(self) -> dict:
    return self.counts

  def kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def run_rounds(address: str, payload: bytes, args: argparse.Namespace) -> tuple[list, dict]:
  """[(solo latencies, flooded latencies)] per round, and the flood's outcome counts."""
  import grpc

  with grpc.insecure_channel(address) as ch:
    call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    md = (("authorization", "Bearer tok-polite"),)

    def measure(seconds: float) -> list[float]:
      out, end = [], time.perf_counter() + seconds
      while time.perf_counter() < end:
        t0 = time.perf_counter()
        call(payload, metadata=md, timeout=10)
        out.append(time.perf_counter() - t0)
      return out

    measure(0.5)  # warm
    flood = (NativeFlood(address, payload, args.clients, args.out, args.flood_token)
             if args.flooder == "native" else
             PythonFlood(address, payload, args.clients, args.flood_token))
    rounds = []
    try:
      for i in range(args.rounds):
        solo = measure(args.seconds)
        flood.go(args.seconds)
        time.sleep(0.1)
        flooded = measure(args.seconds)
        flood.stop()
        time.sleep(0.1)
        rounds.append((solo, flooded))
        say(f"round {i + 1}: p99 solo {np.percentile(solo, 99) * 1e3:.2f} ms, flooded"
            f" {np.percentile(flooded, 99) * 1e3:.2f} ms")
      counts = flood.close()
    finally:
      flood.kill()
  return rounds, counts


def report(rounds: list, counts: dict, args: argparse.Namespace) -> dict:
  pct = lambda xs, q: float(np.percentile(xs, q) * 1e3)  # noqa: E731
  solo = [t for s, _ in rounds for t in s]
  flooded = [t for _, f in rounds for t in f]
  ratios = sorted(pct(f, 99) / pct(s, 99) for s, f in rounds)
  rows = [("alone", len(solo), f"{pct(solo, 50):.2f}", f"{pct(solo, 99):.2f}", ""),
          ("flooded", len(flooded), f"{pct(flooded, 50):.2f}", f"{pct(flooded, 99):.2f}",
           f"{pct(flooded, 99) / pct(solo, 99):.2f}")]
  print(format_table(["polite tenant", "calls", "p50 ms", "p99 ms", "p99 flooded/alone"], rows))
  print(f"per-round p99 ratios {' '.join(f'{r:.2f}' for r in ratios)}, median"
        f" {float(np.median(ratios)):.2f}; flood outcomes {counts}")
  return {"solo_p99_ms": pct(solo, 99), "flooded_p99_ms": pct(flooded, 99),
          "round_ratios": ratios, "flood": counts, "args": vars(args) | {"out": str(args.out)}}


def plot(rounds: list, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  x = np.arange(1, len(rounds) + 1)
  for i, (label, style) in enumerate((("alone", "o-"), ("flooded", "s--"))):
    ax.plot(x, [np.percentile(r[i], 99) * 1e3 for r in rounds], style, label=label)
  ax.set(title="polite tenant p99 per round", xlabel="round", ylabel="p99, ms")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="ctr_light", help="demo model to serve (default ctr_light)")
  p.add_argument("--rounds", type=int, default=10, help="solo + flooded rounds (default 10)")
  p.add_argument("--seconds", type=float, default=0.5, help="seconds per phase (default 0.5)")
  p.add_argument("--clients", type=int, default=16, help="the flood's calls in flight")
  p.add_argument("--quota", type=int, default=50, help="the flooding tenant's requests/s")
  p.add_argument("--flooder", choices=("python", "native"), default="python",
                 help="the flooding client: benchmarks/flooder.py (grpc.aio) or the C++ load"
                 " generator (less client CPU on the shared cores: its calls would come from"
                 " other machines)")
  p.add_argument("--flood-token", default="tok-flood",
                 help="the flood's bearer token (default tok-flood, the over-quota tenant's; any"
                      " other is no tenant's: a flood of bad credentials)")
  p.add_argument("--out", type=pathlib.Path,
                 default=pathlib.Path(tempfile.gettempdir()) / "tenant_isolation")
  args = p.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  from bundle import list_versions, read_manifest
  from demo.repository import ensure_demo_repository

  repo = ensure_demo_repository(say)
  scratch = scratch_repository(repo, args.model)
  bundle = repo / args.model / str(list_versions(repo / args.model)[-1])
  signature = next(iter(read_manifest(bundle).signatures.values())).inputs
  payload = build_request(args.model, make_inputs(signature, 1, np.random.default_rng(0)))
  proc, address, _ = start_server(scratch, ["--tenants", str(tenants_file(args.out, args.quota))])
  try:
    rounds, counts = run_rounds(address, payload, args)
  finally:
    proc.terminate()
    proc.wait(30)
  result = report(rounds, counts, args)
  (args.out / "tenant_isolation.json").write_text(json.dumps(result, indent=1))
  plot(rounds, args.out / "tenant_isolation.png")
  say(f"wrote {args.out / 'tenant_isolation.png'} and .json")


if __name__ == "__main__":
  main()
