"""Continuous vs static batching of the decoder LM through GenerationService, on one engine.

    python benchmarks/generate.py [--bundle DIR | --preset demo|tiny] [--requests N] [--rate R]
                                  [--prompt-len MIN:MAX] [--output-len MIN:MAX] [--out DIR]
                                  [--workload batching|shared-prefix|long-prompt|features|
                                              speculative]

`--workload shared-prefix`, `long-prompt` or `features` (both) instead compares prefix caching
and chunked prefill, each on vs off, in the same run (benchmarks/generate_features.py): TTFT,
TPOT and inter-token gaps p50/p99 and tokens/s per mode; writes features.json and features.png.

`--workload speculative` compares plain decoding with n-gram speculative decoding (K draft
tokens, `--num-speculative-tokens K [K ...]`) on a workload whose completions repeat the prompt's
words and on one where they do not (benchmarks/generate_spec.py): tokens/s, TPOT p50/p99,
acceptance rate; writes speculative.json and speculative.png.

A mixed workload (uniform prompt and output lengths, greedy, EOS ignored so every request
generates exactly its output length) arrives as a Poisson stream at --rate requests/s (0: all at
once). The same arrivals run twice on the same loaded engine: continuous batching (admit into
any free decode slot every step) and static batching (admit only when the whole batch has
finished). Prints tokens/s, TTFT and TPOT p50/p99 for both and their ratio; writes results.json
and generate.png to --out. Without --bundle it exports (and trains) the --preset model into
--out/bundle, or reuses the one there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
import threading
import time
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a bare checkout
# pylint: disable=g-import-not-at-top
from export.generative import GenerativeExportConfig, ad_corpus, build_bundle
from models.decoder import DecoderConfig
from serving.telemetry.compile_watch import CompileCounter
from serving.generation.engine import BundleEngine
from serving.generation.request import GenerationEvent, GenerationRequest, SamplingParams
from serving.generation.service import GenerationService, ServiceConfig
from benchmarks import generate_features, generate_spec
# pylint: enable=g-import-not-at-top

logger = logging.getLogger(__name__)


def _range(text: str) -> tuple[int, int]:
  lo, hi = (int(x) for x in text.split(":"))
  if not 1 <= lo <= hi:
    raise argparse.ArgumentTypeError(f"{text!r} must be MIN:MAX with 1 <= MIN <= MAX")
  return lo, hi


def workload(n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], rate: float,
             seed: int, max_seq_len: int) -> list[dict[str, Any]]:
  """Prompts cut from the ad corpus, output lengths, arrival offsets (s); fits max_seq_len."""
  rng = np.random.default_rng(seed)
  text = " ".join(ad_corpus(500, seed=seed + 1)).encode()
  arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
  jobs = []
  for i in range(n):
    p = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
    p = min(p, max_seq_len - 2)  # BOS + prompt + at least one token
    o = int(min(rng.integers(output_len[0], output_len[1] + 1), max_seq_len - 1 - p))
    start = int(rng.integers(0, len(text) - p))
    jobs.append({"prompt": text[start:start + p], "max_new_tokens": o, "at": float(arrivals[i])})
  return jobs


def run_mode(engine: BundleEngine, jobs: list[dict[str, Any]], *, static: bool) -> dict[str, Any]:
  """Sends the jobs on their schedule, waits for every final event, summarizes."""
  name = "static" if static else "continuous"
  svc = GenerationService(engine, config=ServiceConfig(max_waiting=len(jobs) + 1,
                                                       static_batching=static)).start()
  finals: list[GenerationEvent] = []
  done = threading.Event()
  lock = threading.Lock()
  step = max(1, len(jobs) // 10)

  def on_event(ev: GenerationEvent) -> None:
    if not ev.finished:
      return
    with lock:
      finals.append(ev)
      n = len(finals)
    if n % step == 0 or n == len(jobs):
      print(f"  [{name}] {n}/{len(jobs)} requests done", file=sys.stderr, flush=True)
    if n == len(jobs):
      done.set()

  start = time.perf_counter()
  for job in jobs:
    delay = start + job["at"] - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    svc.submit(GenerationRequest(job["prompt"], SamplingParams(
        max_new_tokens=job["max_new_tokens"], ignore_eos=True)), on_event)
  done.wait()
  wall = time.perf_counter() - start
  stats = svc.stats()
  svc.stop()
  errors = [ev for ev in finals if ev.error is not None]
  if errors:
    raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0].error}")
  m = [ev.metrics for ev in finals]
  ttft = np.array([x.ttft_s for x in m])
  tpot = np.array([x.tpot_s for x in m if x.tpot_s is not None])
  e2e = np.array([x.total_s for x in m])
  tokens = int(sum(x.generated_tokens for x in m))
  pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
  return {
      "mode": name, "requests": len(m), "tokens": tokens, "wall_s": wall,
      "tokens_per_s": tokens / wall, "requests_per_s": len(m) / wall,
      "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
      "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
      "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99),
      "decode_steps": stats["decode_steps"], "prefill_calls": stats["prefill_calls"],
      "mean_decode_rows": stats["decode_rows"] / max(1, stats["decode_steps"]),
      "preemptions": stats["preemptions"],
      "ttft_s": ttft.tolist(), "tpot_s": tpot.tolist(), "e2e_s": e2e.tolist(),
  }


def plot(results: list[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(1, 4, figsize=(17, 4))
  names = [r["mode"] for r in results]
  colors = ["tab:blue", "tab:orange"]
  ax[0].bar(names, [r["tokens_per_s"] for r in results], color=colors)
  ax[0].set_title("throughput (generated tokens/s)")
  for i, (metric, label) in enumerate((("ttft", "TTFT (ms)"), ("tpot", "TPOT (ms)")), start=1):
    x = np.arange(2)
    for j, r in enumerate(results):
      ax[i].bar(x + 0.4 * j, [1e3 * r[f"{metric}_p50_s"], 1e3 * r[f"{metric}_p99_s"]], 0.4,
                label=r["mode"], color=colors[j])
    ax[i].set_xticks(x + 0.2, ["p50", "p99"])
    ax[i].set_title(label)
    ax[i].legend()
  for j, r in enumerate(results):
    e2e = np.sort(r["e2e_s"])
    ax[3].plot(e2e, np.arange(1, len(e2e) + 1) / len(e2e), label=r["mode"], color=colors[j])
  ax[3].set_title("request latency CDF")
  ax[3].set_xlabel("seconds")
  ax[3].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--bundle", type=pathlib.Path, help="a generate bundle (default: build one)")
  p.add_argument("--preset", choices=("demo", "tiny"), default="demo")
  p.add_argument("--train-steps", type=int, default=None, help="when building the bundle")
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--rate", type=float, default=0.0, help="requests/s, Poisson; 0 = all at once")
  p.add_argument("--prompt-len", type=_range, default=(8, 200))
  p.add_argument("--output-len", type=_range, default=(8, 128))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_out/generate"))
  p.add_argument("--workload", default="batching",
                 choices=("batching", "shared-prefix", "long-prompt", "features",
                          "speculative"),
                 help="batching: continuous vs static; the others: prefix caching / chunked"
                 " prefill on vs off (features: both workloads)")
  p.add_argument("--instruction-len", type=int, default=300,
                 help="shared-prefix: bytes of the common instruction")
  p.add_argument("--long-len", type=int, default=440, help="long-prompt: bytes per long prompt")
  p.add_argument("--long-prompts", type=int, default=6, help="long-prompt: how many")
  p.add_argument("--long-every-s", type=float, default=1.0,
                 help="long-prompt: seconds between long prompts")
  p.add_argument("--decode-out", type=int, default=200,
                 help="long-prompt: tokens each running decode generates")
  p.add_argument("--max-num-batched-tokens", type=int, default=None,
                 help="chunked modes' per-step token budget (default: the service's)")
  p.add_argument("--num-speculative-tokens", type=int, nargs="+", default=[2, 4],
                 help="speculative: the draft lengths K to compare with plain decoding")
  p.add_argument("--spec-output-len", type=int, default=48,
                 help="speculative: tokens each request generates")
  p.add_argument("--draft-bundle", type=pathlib.Path, default=None,
                 help="speculative: a draft LM's bundle (export.generative --preset draft) to"
                 " compare too")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="speculative: sampling temperature (0: greedy)")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  args.out.mkdir(parents=True, exist_ok=True)

  bundle = args.bundle
  if bundle is None:
    bundle = args.out / "bundle" / args.preset
    if not (bundle / "manifest.json").exists():
      config = getattr(GenerativeExportConfig, args.preset)()
      if args.train_steps is not None:
        config = dataclasses.replace(config, train_steps=args.train_steps)
      print(f"exporting the {args.preset} model to {bundle} ...", file=sys.stderr, flush=True)
      build_bundle(bundle, model_config=getattr(DecoderConfig, args.preset)(), config=config)
  counter = CompileCounter().install()
  print(f"loading {bundle} ...", file=sys.stderr, flush=True)
  engine = BundleEngine(bundle, compile_counter=counter)
  spec = engine.spec
  if args.workload == "speculative":
    run_speculative(engine, args, counter)
    engine.close()
    return
  if args.workload != "batching":
    run_features(engine, args, counter)
    engine.close()
    return
  jobs = workload(args.requests, args.prompt_len, args.output_len, args.rate, args.seed,
                  spec.max_seq_len)
  results = []
  for static in (False, True):
    print(f"running {'static' if static else 'continuous'} batching ...", file=sys.stderr,
          flush=True)
    results.append(run_mode(engine, jobs, static=static))
  cont, stat = results
  ratio = {
      "tokens_per_s": cont["tokens_per_s"] / stat["tokens_per_s"],
      "ttft_p50": stat["ttft_p50_s"] / cont["ttft_p50_s"],
      "ttft_p99": stat["ttft_p99_s"] / cont["ttft_p99_s"],
      "tpot_p50": stat["tpot_p50_s"] / cont["tpot_p50_s"],
      "tpot_p99": stat["tpot_p99_s"] / cont["tpot_p99_s"],
  }
  header = (f"{'mode':<11}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
            f"{'TPOT p50':>10}{'TPOT p99':>10}{'rows/step':>10}{'preempt':>8}")
  print(f"\n{engine.manifest.name} ({spec.decode_batch} slots, {spec.num_pages} pages of"
        f" {spec.page_size}), {len(jobs)} requests, prompts {args.prompt_len}, outputs"
        f" {args.output_len}, rate {args.rate or 'all at once'}")
  print(header)
  for r in results:
    print(f"{r['mode']:<11}{r['tokens_per_s']:>9.1f}{r['requests_per_s']:>8.2f}"
          f"{1e3 * r['ttft_p50_s']:>8.0f}ms{1e3 * r['ttft_p99_s']:>8.0f}ms"
          f"{1e3 * r['tpot_p50_s']:>8.1f}ms{1e3 * r['tpot_p99_s']:>8.1f}ms"
          f"{r['mean_decode_rows']:>10.1f}{r['preemptions']:>8d}")
  print(f"continuous / static: {ratio['tokens_per_s']:.2f}x tokens/s; static / continuous:"
        f" TTFT p50 {ratio['ttft_p50']:.2f}x, p99 {ratio['ttft_p99']:.2f}x, TPOT p50"
        f" {ratio['tpot_p50']:.2f}x, p99 {ratio['tpot_p99']:.2f}x")
  print(f"compiles after warm-up: {counter.outside_warmup}")
  summary = {
      "bundle": str(bundle), "model": engine.manifest.name, "spec": {
          "decode_batch": spec.decode_batch, "num_pages": spec.num_pages,
          "page_size": spec.page_size, "max_seq_len": spec.max_seq_len,
          "prefill": [[b.length, b.batch] for b in spec.prefill_buckets]},
      "workload": {"requests": args.requests, "rate": args.rate, "prompt_len": args.prompt_len,
                   "output_len": args.output_len, "seed": args.seed},
      "results": results, "ratio": ratio, "compiles_after_warmup": counter.outside_warmup,
  }
  (args.out / "results.json").write_text(json.dumps(summary, indent=1))
  plot(results, args.out / "generate.png",
       f"{engine.manifest.name}: continuous vs static batching ({len(jobs)} requests)")
  print(f"wrote {args.out / 'results.json'} and {args.out / 'generate.png'}")
  engine.close()


def run_features(engine: BundleEngine, args: argparse.Namespace, counter: CompileCounter) -> None:
  """The prefix-caching and chunked-prefill workloads, every mode on this engine."""
  gf, spec = generate_features, engine.spec
  if not spec.extend_buckets:
    raise SystemExit(f"{args.bundle} has no extend signatures: re-export it")
  names = ("shared-prefix", "long-prompt") if args.workload == "features" else (args.workload,)
  jobs = {
      "shared-prefix": lambda: gf.shared_prefix_jobs(args.requests, args.rate, args.seed,
                                                     spec.max_seq_len, args.instruction_len),
      "long-prompt": lambda: gf.long_prompt_jobs(
          spec.decode_batch // 2, args.long_prompts, args.seed, spec.max_seq_len, args.long_len,
          args.decode_out, args.long_every_s)}
  results = {}
  for name in names:
    work = jobs[name]()
    print(f"{name}: {len(work)} requests", file=sys.stderr, flush=True)
    results[name] = [gf.run(engine, work, mode, dataclasses.replace(
        cfg, max_num_batched_tokens=args.max_num_batched_tokens)) for mode, cfg in gf.MODES[name]]
    print(gf.table(name, results[name]))
  print(f"compiles after warm-up: {counter.outside_warmup}")
  (args.out / "features.json").write_text(json.dumps({
      "model": engine.manifest.name, "decode_batch": spec.decode_batch,
      "extend": [[b.length, b.batch] for b in spec.extend_buckets], "args": {
          k: str(v) for k, v in vars(args).items()}, "results": results,
      "compiles_after_warmup": counter.outside_warmup}, indent=1))
  gf.plot(results, args.out / "features.png")
  print(f"wrote {args.out / 'features.json'} and {args.out / 'features.png'}")


def run_speculative(engine: BundleEngine, args: argparse.Namespace,
                    counter: CompileCounter) -> None:
  """Plain vs n-gram speculative decoding on both workloads, on this engine."""
  gs, spec = generate_spec, engine.spec
  if not spec.verify_buckets:
    raise SystemExit(f"{args.bundle} has no verify signatures: re-export it")
  draft = None if args.draft_bundle is None else BundleEngine(args.draft_bundle,
                                                               compile_counter=counter)
  results = gs.run_all(engine, args, draft)
  if draft is not None:
    draft.close()
  for name, rows in results.items():
    print(gs.table(name, rows))
  print(f"compiles after warm-up: {counter.outside_warmup}")
  (args.out / "speculative.json").write_text(json.dumps({
      "model": engine.manifest.name, "decode_batch": spec.decode_batch,
      "verify": [[b.length, b.batch] for b in spec.verify_buckets],
      "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
      "compiles_after_warmup": counter.outside_warmup}, indent=1))
  gs.plot(results, args.out / "speculative.png")
  print(f"wrote {args.out / 'speculative.json'} and {args.out / 'speculative.png'}")


if __name__ == "__main__":
  main()
