"""Prefix caching and chunked prefill, each on vs off, on one loaded engine (benchmarks/generate.py).

Two workloads, each run once per mode in the same process on the same engine:
  shared-prefix  ad-copy prompts: one long common instruction + a short product line, short
                 outputs. Modes: whole prefill / chunked / chunked + prefix cache. Expect TTFT
                 several times lower with the cache (only the product line is prefilled).
  long-prompt    a stream of short-prompt requests decoding long outputs, and long prompts
                 arriving while they decode. Modes: whole prefill / chunked (no cache, so only
                 chunking differs). Expect the decodes' inter-token gap p99 (and TPOT p99) not to
                 spike with chunks, at the price of a longer TTFT for the long prompts.
Reported per request class: TTFT and TPOT p50/p99, inter-token gap (ITL) p50/p99/max, and the
generated tokens/s of the whole run.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import Any

import numpy as np

from export.generative import ad_corpus
from serving.generation.request import GenerationEvent, GenerationRequest, SamplingParams
from serving.generation.service import GenerationService, ServiceConfig

WHOLE = ServiceConfig(chunked_prefill=False, prefix_caching=False)
CHUNKED = ServiceConfig(chunked_prefill=True, prefix_caching=False)
CACHED = ServiceConfig(chunked_prefill=True, prefix_caching=True)
MODES = {"shared-prefix": (("whole prefill", WHOLE), ("chunked", CHUNKED),
                           ("chunked+prefix cache", CACHED)),
         "long-prompt": (("whole prefill", WHOLE), ("chunked", CHUNKED))}
INSTRUCTION = ("You write one line of ad copy for an online store. Keep it under twenty words,"
               " name the brand and the product, state the offer plainly and end with a call to"
               " action. Examples: ")


def shared_prefix_jobs(n: int, rate: float, seed: int, max_seq_len: int,
                       instruction_len: int) -> list[dict[str, Any]]:
  """The common instruction (padded with example ads to `instruction_len` bytes) + a product."""
  rng = np.random.default_rng(seed)
  ads = ad_corpus(200, seed=seed + 1)
  instruction = (INSTRUCTION + " ".join(ads[:40]))[:instruction_len] + "\nProduct: "
  arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
  jobs = []
  for i in range(n):
    line = ads[40 + int(rng.integers(len(ads) - 40))].split(":")[0]
    prompt = (instruction + line + "\nAd:").encode()[:max_seq_len - 20]
    jobs.append({"prompt": prompt, "max_new_tokens": int(rng.integers(8, 17)),
                 "at": float(arrivals[i]), "kind": "shared"})
  return jobs


def long_prompt_jobs(n_decode: int, n_long: int, seed: int, max_seq_len: int,
                     long_len: int, decode_out: int, long_every_s: float) -> list[dict[str, Any]]:
  """`n_decode` short prompts generating `decode_out` tokens from t=0, then a long prompt of
  `long_len` bytes every `long_every_s` seconds (4 tokens each) while they decode."""
  rng = np.random.default_rng(seed)
  text = " ".join(ad_corpus(500, seed=seed + 2)).encode()
  jobs = []
  for i in range(n_decode):
    start = int(rng.integers(0, len(text) - 16))
    jobs.append({"prompt": text[start:start + 16], "at": 0.0, "kind": "decode",
                 "max_new_tokens": min(decode_out, max_seq_len - 18)})
  long_len = min(long_len, max_seq_len - 6)
  for j in range(n_long):
    start = int(rng.integers(0, len(text) - long_len))
    jobs.append({"prompt": text[start:start + long_len], "at": long_every_s * (j + 1),
                 "kind": "long", "max_new_tokens": 4})
  return sorted(jobs, key=lambda j: j["at"])


def run(engine: Any, jobs: list[dict[str, Any]], name: str, config: ServiceConfig, *,
        temperature: float = 0.0, draft: Any = None) -> dict[str, Any]:
  """Sends the jobs on their schedule through a fresh service; per-class latency summary."""
  svc = GenerationService(engine, config=dataclasses.replace(
      config, max_waiting=len(jobs) + 1), draft=draft).start()
  times: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
  finals: dict[int, GenerationEvent] = {}
  done = threading.Event()
  lock = threading.Lock()

  def on_event(i: int, ev: GenerationEvent) -> None:
    now = time.perf_counter()
    with lock:
      if ev.token_id is not None:
        times[i].append(now)
      if ev.finished:
        finals[i] = ev
        if len(finals) == len(jobs):
          done.set()

  start = time.perf_counter()
  for i, job in enumerate(jobs):
    delay = start + job["at"] - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    svc.submit(GenerationRequest(job["prompt"], SamplingParams(
        max_new_tokens=job["max_new_tokens"], ignore_eos=True, temperature=temperature,
        seed=i)), lambda ev, i=i: on_event(i, ev))
  done.wait()
  wall = time.perf_counter() - start
  stats = svc.stats()
  svc.stop()
  errors = [ev for ev in finals.values() if ev.error is not None]
  if errors:
    raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0].error}")
  out: dict[str, Any] = {
      "mode": name, "wall_s": wall,
      "tokens_per_s": sum(ev.metrics.generated_tokens for ev in finals.values()) / wall,
      "prefill_tokens": stats["prefill_tokens"], "prefix_cache_hits": stats["prefix_cache_hits"],
      "prefix_cache_queries": stats["prefix_cache_queries"], "decode_steps": stats["decode_steps"],
      "decode_rows": stats["decode_rows"],
      "spec_draft_tokens": stats["spec_draft_tokens"],
      "spec_accepted_tokens": stats["spec_accepted_tokens"], "classes": {}}
  for kind in sorted({j["kind"] for j in jobs}):
    ids = [i for i, j in enumerate(jobs) if j["kind"] == kind]
    m = [finals[i].metrics for i in ids]
    gaps = np.concatenate([np.diff(times[i]) for i in ids]) if ids else np.zeros(0)
    out["classes"][kind] = {
        "requests": len(ids), **_pct("ttft", [x.ttft_s for x in m]),
        **_pct("tpot", [x.tpot_s for x in m if x.tpot_s is not None]),
        **_pct("itl", gaps.tolist()), "itl_max_s": float(gaps.max()) if len(gaps) else float("nan")}
  print(f"  [{name}] done in {wall:.1f}s", file=sys.stderr, flush=True)
  return out


def _pct(name: str, xs: list[float]) -> dict[str, float]:
  a = np.asarray(xs, float)
  return {f"{name}_p50_s": float(np.percentile(a, 50)) if len(a) else float("nan"),
          f"{name}_p99_s": float(np.percentile(a, 99)) if len(a) else float("nan")}


def table(workload: str, results: list[dict[str, Any]]) -> str:
  """One line per (mode, request class), then the ratios against the first mode."""
  lines = [f"\n{workload}:", f"{'mode':<22}{'class':<8}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
           f"{'TPOT p50':>10}{'TPOT p99':>10}{'ITL p99':>10}{'ITL max':>10}{'prefilled':>10}"]
  for r in results:
    for kind, c in r["classes"].items():
      lines.append(
          f"{r['mode']:<22}{kind:<8}{r['tokens_per_s']:>8.1f}{1e3 * c['ttft_p50_s']:>8.0f}ms"
          f"{1e3 * c['ttft_p99_s']:>8.0f}ms{1e3 * c['tpot_p50_s']:>8.1f}ms"
          f"{1e3 * c['tpot_p99_s']:>8.1f}ms{1e3 * c['itl_p99_s']:>8.1f}ms"
          f"{1e3 * c['itl_max_s']:>8.1f}ms{r['prefill_tokens']:>10d}")
  base = results[0]
  for r in results[1:]:
    for kind, c in r["classes"].items():
      b = base["classes"][kind]
      lines.append(f"{r['mode']} vs {base['mode']} [{kind}]: TTFT p50 {b['ttft_p50_s'] / c['ttft_p50_s']:.2f}x"
                   f" lower, TPOT p99 {b['tpot_p99_s'] / c['tpot_p99_s']:.2f}x lower, ITL p99"
                   f" {b['itl_p99_s'] / c['itl_p99_s']:.2f}x lower, tokens/s"
                   f" {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")
  return "\n".join(lines)


def plot(all_results: dict[str, list[dict[str, Any]]], path: Any) -> None:
  """Per workload: TTFT p50/p99 and the decodes' TPOT / ITL p99 per mode and class."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2 * len(all_results), figsize=(7 * len(all_results), 4),
                           squeeze=False)
  for w, (workload, results) in enumerate(all_results.items()):
    kinds = list(results[0]["classes"])
    for a, (metrics, title) in enumerate(((("ttft_p50_s", "ttft_p99_s"), "TTFT p50 / p99 (ms)"),
                                          (("tpot_p99_s", "itl_p99_s"), "TPOT p99 / ITL p99 (ms)"))):
      ax = axes[0][2 * w + a]
      labels = [f"{k}\n{m[:-2]}" for k in kinds for m in metrics]
      x = np.arange(len(labels))
      width = 0.8 / len(results)
      for j, r in enumerate(results):
        vals = [1e3 * r["classes"][k][m] for k in kinds for m in metrics]
        ax.bar(x + j * width, vals, width, label=r["mode"])
      ax.set_xticks(x + 0.4 - width / 2, labels)
      ax.set_title(f"{workload}: {title}")
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
