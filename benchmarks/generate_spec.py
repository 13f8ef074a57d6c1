"""Speculative decoding (n-gram prompt lookup) on vs off, on one loaded engine (generate.py).

Two workloads, each run once per mode in the same process on the same engine:
  repeat  ad-copy prompts that list a few ads of one brand and product and end with the brand
          and product again: the completion repeats the prompt's words (offers, closers), so
          drafts are often accepted.
  novel   short prompts of random printable bytes with short outputs: the completion shares
          little with the prompt, so drafts are rarely proposed or accepted; this measures the
          cost of speculating where it does not pay.
Modes: plain decoding, then n-gram drafts of K tokens for each K asked, then (with
--draft-bundle, e.g. `python -m export.generative --preset draft --name draft`) the same
with a draft LM. Reported per mode:
generated tokens/s, TPOT p50/p99, acceptance rate (accepted / proposed drafts) and tokens
per decode row and step (1.0 without speculation: on an accelerator, where a decode step costs
about the same with or without the draft positions, the speed-up it bounds).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from benchmarks import generate_features as gf
from export.generative import ad_corpus
from serving.generation.service import ServiceConfig
from serving.generation.speculative import SpeculativeConfig


def modes(ks: tuple[int, ...], draft: bool) -> list[tuple[str, ServiceConfig]]:
  """Plain, n-gram with each K, and with a draft LM (`draft`) each K."""
  base = ServiceConfig()
  methods = ("ngram", "draft") if draft else ("ngram",)
  return [("plain", base)] + [(f"{m} K={k}", dataclasses.replace(
      base, speculative=SpeculativeConfig(m, num_tokens=k))) for m in methods for k in ks]


def repeat_jobs(n: int, rate: float, seed: int, max_seq_len: int,
                out_len: int) -> list[dict[str, Any]]:
  """Prompts: three ads of one brand + product, then that brand + product again."""
  rng = np.random.default_rng(seed)
  ads = ad_corpus(2000, seed=seed + 3)
  by_head: dict[str, list[str]] = {}
  for ad in ads:
    by_head.setdefault(ad.split(":")[0], []).append(ad)
  heads = sorted(h for h, xs in by_head.items() if len(xs) >= 3)
  arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
  jobs = []
  for i in range(n):
    head = heads[int(rng.integers(len(heads)))]
    examples = [by_head[head][int(j)] for j in rng.choice(len(by_head[head]), 3, replace=False)]
    prompt = (" ".join(examples) + f" {head}:").encode()[-(max_seq_len - out_len - 2):]
    jobs.append({"prompt": prompt, "max_new_tokens": out_len, "at": float(arrivals[i]),
                 "kind": "repeat"})
  return jobs


def novel_jobs(n: int, rate: float, seed: int, out_len: int) -> list[dict[str, Any]]:
  """Prompts of 8-24 random printable bytes: nothing for the draft to look up."""
  rng = np.random.default_rng(seed + 1)
  arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
  return [{"prompt": bytes(rng.integers(33, 127, int(rng.integers(8, 25))).tolist()),
           "max_new_tokens": out_len, "at": float(arrivals[i]), "kind": "novel"}
          for i in range(n)]


def run_all(engine: Any, args: Any, draft: Any = None) -> dict[str, list[dict[str, Any]]]:
  """Every workload x mode (greedy, or --temperature) on `engine`; `draft`: a draft LM's
  engine for the draft modes."""
  spec = engine.spec
  work = {"repeat": repeat_jobs(args.requests, args.rate, args.seed, spec.max_seq_len,
                                args.spec_output_len),
          "novel": novel_jobs(args.requests, args.rate, args.seed, args.spec_output_len)}
  return {name: [gf.run(engine, jobs, mode, cfg, temperature=args.temperature, draft=draft if (
      cfg.speculative and cfg.speculative.method == "draft") else None)
                 for mode, cfg in modes(tuple(args.num_speculative_tokens), draft is not None)]
          for name, jobs in work.items()}


def table(workload: str, results: list[dict[str, Any]]) -> str:
  """One line per mode, then each mode's ratios against plain decoding."""
  lines = [f"\n{workload}:", f"{'mode':<13}{'tok/s':>8}{'TPOT p50':>10}{'TPOT p99':>10}"
           f"{'TTFT p50':>10}{'accept':>8}{'tok/row-step':>13}"]
  for r in results:
    c = next(iter(r["classes"].values()))
    rate = r["spec_accepted_tokens"] / max(1, r["spec_draft_tokens"])
    # Tokens per decode row and step, after the prefill's first token of each request.
    per_step = ((r["tokens_per_s"] * r["wall_s"] - r["classes"][next(iter(r["classes"]))][
        "requests"]) / max(1, r["decode_rows"]))
    r["acceptance_rate"], r["tokens_per_step"] = rate, per_step
    lines.append(f"{r['mode']:<13}{r['tokens_per_s']:>8.1f}{1e3 * c['tpot_p50_s']:>8.1f}ms"
                 f"{1e3 * c['tpot_p99_s']:>8.1f}ms{1e3 * c['ttft_p50_s']:>8.0f}ms"
                 f"{rate:>8.2f}{per_step:>13.2f}")
  base = results[0]
  b = next(iter(base["classes"].values()))
  for r in results[1:]:
    c = next(iter(r["classes"].values()))
    lines.append(f"{r['mode']} vs plain: tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}x,"
                 f" TPOT p50 {b['tpot_p50_s'] / c['tpot_p50_s']:.2f}x lower, p99"
                 f" {b['tpot_p99_s'] / c['tpot_p99_s']:.2f}x lower")
  return "\n".join(lines)


def plot(all_results: dict[str, list[dict[str, Any]]], path: Any) -> None:
  """Per workload: tokens/s and TPOT p50/p99 per mode, acceptance in the labels."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2 * len(all_results), figsize=(9 * len(all_results), 4.5),
                           squeeze=False)
  for w, (workload, results) in enumerate(all_results.items()):
    labels = [f"{r['mode']}\nacc {r.get('acceptance_rate', 0):.2f}" for r in results]
    ax = axes[0][2 * w]
    ax.bar(labels, [r["tokens_per_s"] for r in results], color="tab:blue")
    ax.tick_params(axis="x", labelsize=7, rotation=30)
    ax.set_title(f"{workload}: generated tokens/s")
    ax = axes[0][2 * w + 1]
    x = np.arange(len(results))
    for j, q in enumerate(("tpot_p50_s", "tpot_p99_s")):
      ax.bar(x + 0.4 * j, [1e3 * next(iter(r["classes"].values()))[q] for r in results], 0.4,
             label=q[5:8])
    ax.set_xticks(x + 0.2, labels, fontsize=7, rotation=30)
    ax.set_title(f"{workload}: TPOT (ms)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
