"""`xlaserve serve`'s flags for generate models (chunked prefill, prefix caching, speculative
decoding)."""

from __future__ import annotations

import argparse


def add_generation_flags(serve: argparse.ArgumentParser) -> None:
  """Generate models: chunked prefill and prefix caching (bundles with extend signatures)."""
  serve.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                     help="generate models: prefill prompts in chunks under the per-step token"
                     " budget, so a long prompt never stalls running decodes (needs a bundle"
                     " with extend signatures; older bundles prefill whole prompts)")
  serve.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                     help="generate models: tokens one engine step may compute, decode rows plus"
                     " prefill chunk tokens (vLLM's max_num_batched_tokens; >= the decode batch);"
                     " default: decode batch + largest chunk bucket")
  serve.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                     help="generate models: share full KV pages between requests by the hash of"
                     " their token prefix, so a repeated instruction is prefilled once (needs"
                     " --chunked-prefill)")
  serve.add_argument("--speculative", choices=("off", "ngram", "draft"), default="off",
                     help="generate models: speculative decoding; ngram drafts the tokens that"
                     " followed the last match of the sequence's tail in its prompt + output"
                     " (prompt lookup), draft has a small LM (--speculative-model) draft them;"
                     " the model verifies them in one pass, same output distribution (needs a"
                     " bundle with verify signatures and --chunked-prefill)")
  serve.add_argument("--speculative-model", default=None, metavar="NAME",
                     help="generate models, --speculative draft: the draft LM, a generate model"
                     " in the same repository exported with the same GenerativeExportConfig")
  serve.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                     help="generate models: draft tokens verified per step with --speculative"
                     " (the bundle needs a verify_<C> signature with C >= K + 1)")
