"""The demo retrieval -> ranking pipeline against its steps measured alone, in one run.

  python benchmarks/pipeline.py [--seconds 6] [--rounds 2] [--concurrency 8] [--out DIR]
                                [--handoff auto|device|host]

Serves `two_tower`, `ad_index`, `ranker` and `ads_pipeline` from the demo repository (built if
missing) in one `xlaserve serve`, then drives, each alone: every model step with the request
the pipeline sends it (one query's tokens; one query embedding; one user and query against the
K retrieved ads), and the pipeline (query text and user in, the top 10 ads out). At saturation
(closed loop) the pipeline's requests/s is compared with the ideal of its steps run back to
back, 1 / sum(1 / throughput_i); at low load (one request at a time) its p50 with the sum of
the steps' p50s. Load comes from the C++ load generator (benchmarks/native_loadgen.cc; the
Python one where it does not build). `--handoff` sets where tensors pass from one model step
to the next (the pipeline's `handoff`; auto: on the device on accelerators, through the host on
CPU); the hand-offs counted by where they happened are printed too. Prints the per-step table,
writes pipeline.png and pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import struct
import sys
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.context import loadgen  # noqa: E402
from benchmarks.http_serving import free_port, scratch_repository, start_server  # noqa: E402
from benchmarks.loadgen import build_request, format_table  # noqa: E402

MODELS = ("two_tower", "ad_index", "ranker", "ads_pipeline")
QUERY = b"acme running shoes"
SATURATION, LATENCY = 0.8, 1.3  # issue 15's targets


def say(msg: str) -> None:
  print(f"[pipeline-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bytes_request(model: str, text: bytes, others: dict[str, np.ndarray]) -> bytes:
  """A serialized ModelInferRequest with one BYTES input `query` (length-prefixed raw)."""
  from bundle import triton_datatype
  from serving.frontend.protocol import grpc_service_pb2 as pb

  req = pb.ModelInferRequest(model_name=model)
  req.inputs.add(name="query", datatype="BYTES", shape=[1])
  req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
  for name, arr in others.items():
    req.inputs.add(name=name, datatype=triton_datatype(arr.dtype), shape=list(arr.shape))
    req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
  return req.SerializeToString()


def step_payloads(address: str, k: int) -> dict[str, bytes]:
  """What the pipeline sends each model step, built from real answers of the served steps."""
  import tritonclient.grpc as tc

  from models.ranking import RankerConfig

  cfg, rng = RankerConfig.demo(), np.random.default_rng(0)
  user = {"history": rng.integers(0, cfg.history_rows, (1, cfg.history_len)).astype(np.int32),
          "user_dense": rng.normal(size=(1, cfg.user_dense)).astype(np.float32)}
  tokens = {"token_ids": np.frombuffer(QUERY, np.uint8).astype(np.int32)[None],
            "lengths": np.array([len(QUERY)], np.int32)}

  def call(client, model, ins):
    inputs = []
    for name, arr in ins.items():
      i = tc.InferInput(name, list(arr.shape), "INT32" if arr.dtype == np.int32 else "FP32")
      i.set_data_from_numpy(arr)
      inputs.append(i)
    res = client.infer(model, inputs, client_timeout=60)
    return {o.name: res.as_numpy(o.name) for o in res.get_response().outputs}

  with tc.InferenceServerClient(address) as c:
    query = call(c, "two_tower_query", tokens)["embedding"]
    found = call(c, "ad_index", {"query": query})
  ranking = {**user, "query": query, "ad_sparse": found["ad_sparse"].reshape(k, -1),
             "ad_dense": found["ad_dense"].reshape(k, -1)}
  return {"two_tower_query": build_request("two_tower_query", tokens),
          "ad_index": build_request("ad_index", {"query": query}),
          "ranker": build_request("ranker", ranking),
          "ads_pipeline": bytes_request("ads_pipeline", QUERY, user)}


def set_handoff(model_dir: pathlib.Path, mode: str) -> None:
  """Sets the pipeline's `handoff` in every version's manifest (new files: the scratch
  repository's are hard links to the demo repository's)."""
  for manifest in model_dir.glob("*/manifest.json"):
    d = json.loads(manifest.read_text())
    d["pipeline"]["handoff"] = mode
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    os.replace(tmp, manifest)


def handoff_counts(metrics_port: int) -> dict[str, float]:
  """"<step>.<input> <where>" -> tensors handed over, from the server's metrics."""
  text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read()
  out = {}
  for line in text.decode().splitlines():
    if line.startswith("xlaserve_pipeline_handoffs_total{"):
      labels = dict(x.split("=", 1) for x in line[line.index("{") + 1:line.index("}")].split(","))
      labels = {k: v.strip('"') for k, v in labels.items()}
      out[f"{labels['step']}.{labels['input']} {labels['where']}"] = float(line.split()[-1])
  return out


def measure(address: str, payloads: dict[str, bytes], args: argparse.Namespace,
            run_load) -> dict[str, dict[str, float]]:
  """Per target: requests/s at saturation (best concurrency) and p50/p99 one at a time."""
  out = {}
  for target, payload in payloads.items():
    low = run_load(address, payload, rows_per_request=1, concurrency=1, duration=args.seconds / 2,
                   timeout=30.0)
    best = None
    for conc in args.concurrency:
      r = run_load(address, payload, rows_per_request=1, concurrency=conc, duration=args.seconds,
                   timeout=30.0)
      if r.errors or low.errors:
        raise RuntimeError(f"{target}: errors under load: {r.errors or low.errors}")
      if best is None or r.rps > best.rps:
        best = r
    out[target] = {"rps": best.rps, "p99_ms_saturated": best.pct_ms(99),
                   "p50_ms_low": low.pct_ms(50), "p99_ms_low": low.pct_ms(99)}
    say(f"  {target}: {best.rps:,.0f} req/s saturated; one at a time p50"
        f" {low.pct_ms(50):.2f} ms")
  return out


def verdicts(results: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, float]]:
  steps = [m for m in results if m != "ads_pipeline"]
  ideal = 1.0 / sum(1.0 / results[m]["rps"] for m in steps)
  p50_sum = sum(results[m]["p50_ms_low"] for m in steps)
  pipe = results["ads_pipeline"]
  ratio, lat = pipe["rps"] / ideal, pipe["p50_ms_low"] / p50_sum
  return ([f"saturation: pipeline {pipe['rps']:,.0f} req/s vs ideal {ideal:,.0f} (1/sum 1/T"
           f" of its steps): {ratio:.2f} (target >= {SATURATION}:"
           f" {'met' if ratio >= SATURATION else 'MISSED'})",
           f"low load: pipeline p50 {pipe['p50_ms_low']:.2f} ms vs the steps' p50 sum"
           f" {p50_sum:.2f} ms: {lat:.2f}x (target <= {LATENCY}x:"
           f" {'met' if lat <= LATENCY else 'MISSED'})"],
          {"ideal_rps": ideal, "saturation_ratio": ratio, "steps_p50_sum_ms": p50_sum,
           "latency_ratio": lat})


def plot(results: dict[str, dict[str, float]], summary: dict[str, float],
         path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(results) + ["ideal"]
  rps = [results[m]["rps"] for m in results] + [summary["ideal_rps"]]
  p50 = [results[m]["p50_ms_low"] for m in results] + [summary["steps_p50_sum_ms"]]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, values, label in ((axes[0], rps, "requests/s at saturation"),
                            (axes[1], p50, "p50 ms, one request at a time")):
    ax.bar(names, values, color=["tab:blue"] * 3 + ["tab:green", "tab:gray"])
    ax.set_title(label)
    ax.tick_params(axis="x", rotation=20)
    for i, v in enumerate(values):
      ax.text(i, v, f"{v:,.1f}" if v < 100 else f"{v:,.0f}", ha="center", va="bottom",
              fontsize=8)
  axes[1].text(len(names) - 1, 0, "sum", ha="center", va="bottom", fontsize=8)
  fig.suptitle(f"retrieval -> ranking pipeline vs its steps ({os.cpu_count()} cores)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--seconds", type=float, default=6.0, help="seconds per saturated run")
  ap.add_argument("--rounds", type=int, default=2, help="rounds; the best of each is kept")
  ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                  default=[8, 16, 32], help="closed-loop concurrencies tried at saturation")
  ap.add_argument("--server-args", default="", help="extra flags for xlaserve serve")
  ap.add_argument("--handoff", choices=("auto", "device", "host"), default="auto",
                  help="where tensors pass between model steps (the pipeline's handoff)")
  ap.add_argument("--out", type=pathlib.Path, default=ROOT / "bench_out" / "pipeline")
  ap.add_argument("--repository", type=pathlib.Path, default=None,
                  help="a repository holding the four models (default: the demo repository,"
                       " built if missing)")
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  from demo.ads import DEMO_K
  from demo.repository import ensure_demo_repository

  repo = args.repository or ensure_demo_repository(say)
  run_load, generator = loadgen()
  scratch = scratch_repository(repo, MODELS[0])
  for m in MODELS[1:]:
    extra = scratch_repository(repo, m)
    (extra / m).rename(scratch / m)
    extra.rmdir()
  set_handoff(scratch / "ads_pipeline", args.handoff)
  port, metrics_port = free_port(), free_port()
  proc = start_server(scratch, port, free_port(),
                      [*args.server_args.split(), "--metrics-port", str(metrics_port)])
  address = f"127.0.0.1:{port}"
  try:
    payloads = step_payloads(address, DEMO_K)
    results: dict[str, dict[str, float]] = {}
    for rnd in range(args.rounds):
      say(f"round {rnd + 1} of {args.rounds} ({generator})")
      for target, r in measure(address, payloads, args, run_load).items():
        old = results.get(target)
        results[target] = r if old is None else {
            "rps": max(old["rps"], r["rps"]),
            "p99_ms_saturated": min(old["p99_ms_saturated"], r["p99_ms_saturated"]),
            "p50_ms_low": min(old["p50_ms_low"], r["p50_ms_low"]),
            "p99_ms_low": min(old["p99_ms_low"], r["p99_ms_low"])}
    handoffs = handoff_counts(metrics_port)
  finally:
    proc.terminate()
    proc.wait(60)
    shutil.rmtree(scratch, ignore_errors=True)
  lines, summary = verdicts(results)
  print(format_table(["target", "req/s saturated", "p99 ms saturated", "p50 ms 1-at-a-time",
                      "p99 ms 1-at-a-time"],
                     [[t, f"{r['rps']:,.0f}", f"{r['p99_ms_saturated']:.1f}",
                       f"{r['p50_ms_low']:.2f}", f"{r['p99_ms_low']:.2f}"]
                      for t, r in results.items()]))
  print("\n".join(lines))
  print(f"hand-offs between model steps (--handoff {args.handoff}): " + ", ".join(
      f"{k} {v:,.0f}" for k, v in sorted(handoffs.items())))
  (args.out / "pipeline.json").write_text(json.dumps({
      "load_generator": generator, "seconds": args.seconds, "rounds": args.rounds,
      "cores": os.cpu_count(), "k": DEMO_K, "results": results, **summary,
      "handoff": args.handoff, "handoffs": handoffs,
      "verdicts": lines}, indent=1))
  plot(results, summary, args.out / "pipeline.png")
  say(f"wrote {args.out / 'pipeline.png'} and {args.out / 'pipeline.json'}")


if __name__ == "__main__":
  main()
