"""Quantized weights for the decoder LM: perplexity, agreement with float32, bytes and served tokens/s.

  python benchmarks/lm_quant.py [--quick] [--weights none,fp8,awq,int4] [--prompts 16]
                                [--tokens 32] [--requests 32] [--out DIR]

The demo LM (the shipped trained weights, demo/weights.py; trained now if they are stale) is
quantized per --weights name: fp8 (export/quantize.py, per-output-channel float8_e4m3fn), awq
(int4, activation-aware scales, export/awq.py) and int4 (the same int4 format, round to nearest:
what AWQ's search is worth). For each: held-out perplexity (ad corpus, seed 2), top-1 agreement
with float32 (teacher-forced, every held-out position), greedy agreement (free-running greedy
continuations of --prompts prompts, position by position), bytes per parameter (whole model; the
quantized layers alone), then the exported bundle is loaded by the serving engine and a fixed
workload generates through GenerationService (continuous batching): tokens/s. Prints a table,
writes lm_quant.json and lm_quant.png to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a bare checkout
# pylint: disable=g-import-not-at-top
from benchmarks.generate import run_mode, workload
from benchmarks.quantization import bundle_bytes
from demo.weights import trained_lm
from export.awq import AwqConfig, calibration_tokens, quantize_generate_weights
from export.generative import GenerativeExportConfig, ad_corpus, export_generative
from export.lm_eval import (HELD_OUT_SEED, bytes_per_param, greedy_agreement, perplexity,
                            top1_agreement)
from models.decoder import DecoderConfig, greedy_reference
from models.tokenizer import ByteTokenizer
from serving.generation.engine import BundleEngine
from serving.telemetry.compile_watch import CompileCounter
# pylint: enable=g-import-not-at-top

CHOICES = ("none", "int8", "fp8", "awq", "int4")


def say(msg: str) -> None:
  print(f"[lm_quant {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quality(model, qmodel, held: np.ndarray, prompts: list[list[int]], tokens: int,
             float_greedy: list[list[int]]) -> dict[str, Any]:
  tok = ByteTokenizer()
  greedy = (float_greedy if qmodel is model else
            greedy_reference(qmodel, prompts, max_new_tokens=tokens, eos_id=tok.eos_id))
  return {"perplexity": perplexity(qmodel, held),
          "top1_agreement": 1.0 if qmodel is model else top1_agreement(model, qmodel, held),
          "greedy_agreement": greedy_agreement(float_greedy, greedy),
          **{f"bytes_per_param_{k}": v for k, v in bytes_per_param(model, qmodel).items()}}


def _served_tokens_per_s(model, weights: str, config: GenerativeExportConfig, tmp: pathlib.Path,
                         jobs: list[dict[str, Any]]) -> dict[str, Any]:
  """Exports `model` with `weights`, loads the bundle in the serving engine, runs `jobs`."""
  t0 = time.perf_counter()
  path = export_generative(model, tmp / weights / "1", dataclasses.replace(config, weights=weights),
                           name=f"decoder_{weights}")
  export_s = time.perf_counter() - t0
  engine = BundleEngine(path, compile_counter=CompileCounter().install())
  try:
    run_mode(engine, jobs[:4], static=False)  # warm
    r = run_mode(engine, jobs, static=False)
  finally:
    engine.close()
  return {"export_s": export_s, "tokens_per_s": r["tokens_per_s"],
          "tpot_p50_ms": 1e3 * r["tpot_p50_s"], "param_bytes": sum(bundle_bytes(path).values())}


def main(argv: list[str] | None = None) -> None:
  args = _parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  names = tuple(args.weights.split(","))
  for n in names:
    if n not in CHOICES:
      raise SystemExit(f"--weights: {n!r} is not one of {CHOICES}")
  if names[0] != "none":
    names = ("none",) + tuple(n for n in names if n != "none")  # float32 is the baseline
  model_config, config = DecoderConfig.demo(), GenerativeExportConfig.demo()
  model, info = trained_lm(model_config, config, say)
  held = calibration_tokens(ad_corpus(args.held_out_lines, seed=HELD_OUT_SEED), 128)
  tok = ByteTokenizer()
  prompts = [tok.encode(line[:16]) for line in ad_corpus(args.prompts, seed=HELD_OUT_SEED + 1)]
  float_greedy = greedy_reference(model, prompts, max_new_tokens=args.tokens, eos_id=tok.eos_id)
  served_config = dataclasses.replace(config, prefill_lengths=(128, 512))
  jobs = workload(args.requests, (8, 100), (16, 64), 0.0, 0, model_config.max_seq_len)
  results = []
  with tempfile.TemporaryDirectory(prefix="xlaserve-lmq-") as tmp:
    for name in names:
      t0 = time.perf_counter()
      qmodel, extra = (model, {}) if name == "none" else quantize_generate_weights(
          model, name, group_size=args.group_size, seed=config.seed + 1)
      quant_s = time.perf_counter() - t0
      r = {"weights": name, "quantize_s": quant_s,
           **_quality(model, qmodel, held, prompts, args.tokens, float_greedy)}
      say(f"[{name}] perplexity {r['perplexity']:.4f}, top-1 {r['top1_agreement']:.4f},"
          f" greedy {r['greedy_agreement']:.3f}; serving ...")
      if not args.no_serve:
        r |= _served_tokens_per_s(model, name, served_config, pathlib.Path(tmp), jobs)
      if extra:
        r["layers"] = extra["int4"]["layers"]
      results.append(r)
  _print_table(results, held, args)
  summary = {"weights": info.get("weights"), "held_out_windows": int(held.shape[0]),
             "prompts": args.prompts, "tokens": args.tokens, "group_size": args.group_size,
             "calibration": dataclasses.asdict(AwqConfig(group_size=args.group_size)),
             "requests": args.requests, "results": results}
  (args.out / "lm_quant.json").write_text(json.dumps(summary, indent=1))
  _plot(results, args.out / "lm_quant.png")
  say(f"wrote {args.out / 'lm_quant.json'} and {args.out / 'lm_quant.png'}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="fewer held-out lines, prompts, requests")
  p.add_argument("--weights", default="none,fp8,awq,int4", help=f"comma-separated, of {CHOICES}")
  p.add_argument("--group-size", type=int, default=128, help="int4 group size along K")
  p.add_argument("--prompts", type=int, default=None, help="greedy-agreement prompts (32)")
  p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
  p.add_argument("--held-out-lines", type=int, default=None, help="held-out ad lines (400)")
  p.add_argument("--requests", type=int, default=None, help="served requests per choice (32)")
  p.add_argument("--no-serve", action="store_true", help="quality only: no export, no tokens/s")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/lm_quant"))
  args = p.parse_args(argv)
  args.prompts = args.prompts or (8 if args.quick else 32)
  args.held_out_lines = args.held_out_lines or (100 if args.quick else 400)
  args.requests = args.requests or (8 if args.quick else 32)
  return args


def _print_table(results: list[dict[str, Any]], held: np.ndarray, args) -> None:
  base = results[0]["perplexity"]
  print(f"\ndemo LM, held-out ad text {held.shape[0]} x {held.shape[1]} tokens; greedy agreement"
        f" over {args.prompts} prompts x {args.tokens} tokens; int4 group {args.group_size}")
  print(f"{'weights':<8}{'ppl':>9}{'dppl %':>8}{'top-1':>8}{'greedy':>8}{'B/param':>9}"
        f"{'B/p layers':>11}{'tok/s':>8}")
  for r in results:
    print(f"{r['weights']:<8}{r['perplexity']:>9.4f}{100 * (r['perplexity'] / base - 1):>+8.2f}"
          f"{r['top1_agreement']:>8.4f}{r['greedy_agreement']:>8.3f}"
          f"{r['bytes_per_param_model']:>9.3f}{r['bytes_per_param_layers']:>11.3f}"
          f"{r.get('tokens_per_s', float('nan')):>8.1f}")


def _plot(results: list[dict[str, Any]], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = [r["weights"] for r in results]
  x = np.arange(len(names))
  base = results[0]["perplexity"]
  fig, ax = plt.subplots(1, 4, figsize=(17, 4))
  ax[0].bar(x, [100 * (r["perplexity"] / base - 1) for r in results], color="C0")
  ax[0].set_title(f"perplexity vs float32 (%; float32 {base:.3f})")
  ax[1].bar(x - 0.2, [r["top1_agreement"] for r in results], 0.4, label="top-1 (teacher-forced)")
  ax[1].bar(x + 0.2, [r["greedy_agreement"] for r in results], 0.4, label="greedy (free-running)")
  ax[1].set_ylim(0, 1.05)
  ax[1].set_title("agreement with float32")
  ax[1].legend(loc="lower left")
  ax[2].bar(x - 0.2, [r["bytes_per_param_model"] for r in results], 0.4, label="whole model")
  ax[2].bar(x + 0.2, [r["bytes_per_param_layers"] for r in results], 0.4,
            label="quantized layers")
  ax[2].set_title("bytes per parameter")
  ax[2].legend()
  ax[3].bar(x, [r.get("tokens_per_s", 0.0) for r in results], color="C2")
  ax[3].set_title("served tokens/s (CPU, continuous batching)")
  for a in ax:
    a.set_xticks(x, names)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
