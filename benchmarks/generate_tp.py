"""Tensor-parallel decoding of the decoder LM: 1 device vs `--sharding tensor` on 2 and 4.

    python benchmarks/generate_tp.py [--bundle DIR | --preset tiny|demo] [--devices 1,2,4]
                                     [--requests N] [--rate R] [--out DIR]

Each mesh size loads the same bundle (serving/generation/placement.py), runs the same mixed
workload through continuous batching (benchmarks/generate.py's `workload` and `run_mode`), and
reports tokens/s, TPOT p50/p99, the bytes of weights and KV cache on each device (from the placed
arrays' shards), the collectives of one decode step (from the compiled HLO), and whether greedy
output is token for token that of one device. Writes generate_tp.json and generate_tp.png.
On virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N, set here when
absent) the devices share the host's cores: the speed columns are not meaningful there, the
memory and collective columns are.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import logging
import pathlib
import sys
import threading
from typing import Any

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a bare checkout
import bundle as bundle_lib
from benchmarks.generate import _range, run_mode, workload
from export.generative import GenerativeExportConfig, build_bundle
from models.decoder import DecoderConfig
from serving.generation.engine import BundleEngine
from serving.generation.placement import lm_placement
from serving.generation.request import GenerationRequest, SamplingParams
from serving.generation.service import GenerationService
from serving.telemetry.compile_watch import CompileCounter
from sharding.hlo import collective_stats
# pylint: enable=g-import-not-at-top,wrong-import-position

SPEED_NOTE = ("virtual CPU devices share the host's cores: tokens/s and TPOT are not meaningful"
              " here (bytes and collectives are)")


def greedy_tokens(engine: BundleEngine, jobs: list[dict[str, Any]]) -> list[list[int]]:
  """Greedy tokens of every job, all submitted at once (the parity check across meshes)."""
  svc = GenerationService(engine).start()
  outs: list[list[int]] = [[] for _ in jobs]
  done = threading.Semaphore(0)

  def collect(i: int):
    def on_event(ev):
      if ev.token_id is not None:
        outs[i].append(ev.token_id)
      if ev.finished:
        done.release()
    return on_event

  for i, job in enumerate(jobs):
    svc.submit(GenerationRequest(job["prompt"], SamplingParams(
        max_new_tokens=job["max_new_tokens"])), collect(i))
  for _ in jobs:
    done.acquire()
  svc.stop()
  return outs


def measure(bundle: pathlib.Path, n: int, jobs: list[dict[str, Any]], check: list[dict[str, Any]],
            counter: CompileCounter) -> tuple[dict[str, Any], list[list[int]]]:
  """One mesh size: load, run the workload, read bytes and collectives; (row, greedy tokens)."""
  manifest = bundle_lib.read_manifest(bundle)
  placement = lm_placement(manifest, strategy="tensor" if n > 1 else None,
                           devices=jax.devices()[:n])
  print(f"loading on {n} device(s): {placement.label}", file=sys.stderr, flush=True)
  engine = BundleEngine(bundle, compile_counter=counter, placement=placement)
  try:
    before = counter.outside_warmup
    tokens = greedy_tokens(engine, check)
    row = run_mode(engine, jobs, static=False)
    mem = engine.memory().devices
    decode = collective_stats(engine.executables[engine.spec.decode_signature].as_text())
    row.update(
        mode=f"{n} device{'s' if n > 1 else ''}", devices=n, placement=placement.label,
        weight_bytes=[d.params for d in mem], kv_bytes=[d.kv_cache for d in mem],
        decode_collectives={k: v for k, v in decode.count.items() if v},
        decode_collective_bytes=decode.total_bytes,
        compiles_after_warmup=counter.outside_warmup - before)
    for key in ("ttft_s", "tpot_s", "e2e_s"):
      row.pop(key)
    return row, tokens
  finally:
    engine.close()


def table(rows: list[dict[str, Any]]) -> str:
  mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
  lines = [f"{'mesh':<10}{'tok/s':>8}{'TPOT p50':>10}{'TPOT p99':>10}{'weights/dev MiB':>16}"
           f"{'KV/dev MiB':>11}{'decode collectives':>30}{'same':>6}"]
  for r in rows:
    coll = ", ".join(f"{v} {k}" for k, v in r["decode_collectives"].items()) or "none"
    coll += f" ({r['decode_collective_bytes']} B)"
    lines.append(
        f"{r['mode']:<10}{r['tokens_per_s']:>8.1f}{1e3 * r['tpot_p50_s']:>8.1f}ms"
        f"{1e3 * r['tpot_p99_s']:>8.1f}ms{mib(max(r['weight_bytes'])):>16}"
        f"{mib(max(r['kv_bytes'])):>11}{coll:>30}"
        f"{'yes' if r['greedy_same'] else 'NO':>6}")
  return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  fig, ax = plt.subplots(1, 4, figsize=(18, 4))
  names = [r["mode"] for r in rows]
  ax[0].bar(names, [r["tokens_per_s"] for r in rows])
  ax[0].set_title("tokens/s (not meaningful on virtual CPU devices)", fontsize=9)
  x = np.arange(len(rows))
  ax[1].bar(x - 0.2, [1e3 * r["tpot_p50_s"] for r in rows], 0.4, label="p50")
  ax[1].bar(x + 0.2, [1e3 * r["tpot_p99_s"] for r in rows], 0.4, label="p99")
  ax[1].set_xticks(x, names)
  ax[1].set_title("TPOT (ms)")
  ax[1].legend()
  w = [max(r["weight_bytes"]) / 2**20 for r in rows]
  ax[2].bar(names, w, label="weights")
  ax[2].bar(names, [max(r["kv_bytes"]) / 2**20 for r in rows], bottom=w, label="KV cache")
  ax[2].set_title("MiB on each device")
  ax[2].legend()
  ax[3].bar(names, [sum(r["decode_collectives"].values()) for r in rows])
  ax[3].set_title("collectives per decode step")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bundle", type=pathlib.Path, help="a generate bundle (default: build one)")
  p.add_argument("--preset", choices=("demo", "tiny"), default="tiny")
  p.add_argument("--devices", default="1,2,4", help="mesh sizes to compare, comma-separated")
  p.add_argument("--requests", type=int, default=32)
  p.add_argument("--rate", type=float, default=0.0, help="requests/s, Poisson; 0 = all at once")
  p.add_argument("--prompt-len", type=_range, default=(8, 60))
  p.add_argument("--output-len", type=_range, default=(8, 48))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/generate_tp"))
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
  args.out.mkdir(parents=True, exist_ok=True)
  bundle = args.bundle
  if bundle is None:
    bundle = args.out / "bundle" / args.preset
    if not (bundle / "manifest.json").exists():
      print(f"exporting the {args.preset} model to {bundle} ...", file=sys.stderr, flush=True)
      build_bundle(bundle, model_config=getattr(DecoderConfig, args.preset)(),
                   config=getattr(GenerativeExportConfig, args.preset)())
  spec_len = bundle_lib.read_manifest(bundle).extra["max_seq_len"]
  jobs = workload(args.requests, args.prompt_len, args.output_len, args.rate, args.seed, spec_len)
  check = jobs[:8]
  counter = CompileCounter().install()
  rows, first = [], None
  for n in (int(x) for x in args.devices.split(",")):
    row, tokens = measure(bundle, n, jobs, check, counter)
    first = tokens if first is None else first
    row["greedy_same"] = tokens == first
    rows.append(row)
  model = bundle_lib.read_manifest(bundle).extra["model"]
  print(f"\n{bundle.name}: {model['num_layers']} layers, {model['num_heads']} heads /"
        f" {model['num_kv_heads']} kv heads, mlp {model['mlp_dim']}, vocab {model['vocab_size']};"
        f" {len(jobs)} requests; on {jax.devices()[0].platform}")
  print(table(rows))
  if jax.devices()[0].platform == "cpu":
    print(f"note: {SPEED_NOTE}")
  (args.out / "generate_tp.json").write_text(json.dumps({
      "bundle": str(bundle), "model": model, "platform": jax.devices()[0].platform,
      "note": SPEED_NOTE, "rows": rows}, indent=1))
  plot(rows, args.out / "generate_tp.png", f"{bundle.name}: tensor-parallel decoding")
  print(f"wrote {args.out / 'generate_tp.json'} and {args.out / 'generate_tp.png'}")


if __name__ == "__main__":
  main()
