"""Decoder LM -> `kind="generate"` bundle: prefill and extend signatures per length bucket, one decode.

Weights come from a short training run, at export time, on a synthetic ad-copy corpus built
here from templates (nothing is downloaded), so greedy generations read like ads, not noise.

Signatures (call convention of bundle/format.py, `fn(params, inputs) -> outputs`):
  prefill_<T>  tokens [b, T], lengths [b], page_table [b, P], <cache>  -> logits [b, V], <cache>
  decode       tokens [B], positions [B], page_table [B, P], lengths [B], <cache>
               -> logits [B, V], <cache>
  extend_<C>   tokens [b, C], starts [b], lengths [b], page_table [b, P], <cache>
               -> logits [b, V], <cache>   (a prefill chunk at an offset: chunked prefill and
               prefix caching; listed in `extra["extend"]`, absent from older bundles)
  verify_<C>   as extend_<C> with b = the decode batch -> logits [b, C, V] at every position
               (speculative decoding; `extra["verify"]`; both from export/chunk_entries.py)
`<cache>` is every array in `manifest.extra["kv_cache"]` (k_pages, v_pages, plus k_scale,
v_scale for an int8 cache); the server passes them in and takes the updated ones back.

Run: `python -m export.generative --repo model_repo --preset demo` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bundle as bundle_lib
from bundle import Manifest, Signature, TensorSpec
from export.tracing import disabled_checks, nnx_parts
from export.chunk_entries import chunk_entries
from models.decoder import CACHE_AXES, KV_DTYPES, NULL_PAGE, Decoder, DecoderConfig, cache_shapes
from models.tokenizer import ByteTokenizer
from pallas_kernels.common import is_pow2

logger = logging.getLogger(__name__)

# The synthetic corpus: every combination is an ad line; a seeded sample of them is the text.
_BRANDS = ("Northwind", "Acme", "Bluebird", "Cedar & Co.", "Lumen", "Harbor", "Summit",
           "Pixel Lane", "Maple Street", "Orbit")
_PRODUCTS = ("running shoes", "rain jackets", "coffee beans", "desk lamps", "yoga mats",
             "headphones", "backpacks", "tea sets", "phone cases", "garden tools", "wool socks",
             "water bottles", "board games", "sunglasses")
_OFFERS = ("save {n}% today", "buy one, get one free", "free shipping on orders over ${m}",
           "{n}% off your first order", "limited time: {n}% off", "new arrivals every week",
           "prices from ${m}", "members get {n}% back")
_CLOSERS = ("Shop now.", "Order today.", "While supplies last.", "Find your fit.",
            "Members save more.", "Try it risk free for 30 days.", "Free returns, always.",
            "Visit a store near you.")


def ad_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
  """Template ad copy, e.g. "Acme headphones: save 20% today. Shop now."."""
  rng = np.random.default_rng(seed)
  lines = []
  for _ in range(num_lines):
    offer = _OFFERS[rng.integers(len(_OFFERS))].format(
        n=int(rng.choice([10, 15, 20, 25, 30, 40, 50])), m=int(rng.choice([25, 35, 50, 75, 99])))
    lines.append(f"{_BRANDS[rng.integers(len(_BRANDS))]} {_PRODUCTS[rng.integers(len(_PRODUCTS))]}"
                 f": {offer}. {_CLOSERS[rng.integers(len(_CLOSERS))]}")
  return lines


@dataclasses.dataclass(frozen=True, slots=True)
class GenerativeExportConfig:
  """KV cache geometry, buckets, platforms and the training run of a generate bundle.

  The number of compiled shapes a server runs is `len(prefill_lengths) + len(chunk_lengths) + 1`
  (the decode). Prefill bucket T runs `min(decode_batch, max(1, prefill_tokens // T))` rows at
  once; chunk bucket C runs `extend_batch(C)` rows, so every extend call computes at most the
  largest chunk's worth of tokens (a chunk step's cost is bounded, whatever the bucket).
  `chunk_lengths` () exports no extend signatures.
  """

  page_size: int = 16
  num_pages: int = 512  # including the null page
  prefill_lengths: tuple[int, ...] = (32, 64, 128, 256, 512)
  prefill_tokens: int = 256
  chunk_lengths: tuple[int, ...] = (32, 64, 128)
  verify_lengths: tuple[int, ...] = (3, 5)  # 1 + draft tokens per speculative step; () none
  decode_batch: int = 16
  kv_dtype: str = "float32"
  weights: str = "none"  # export.quantize name for the Dense layers (MLP, head): "none", "int8", ...
  # ... or "awq" / "int4" (export/awq.py: int4 with per-group scales, AWQ-scaled or round-to-nearest)
  int4_group_size: int = 128
  platforms: tuple[str, ...] = ("cpu",)
  train_steps: int = 150
  train_batch: int = 16
  train_seq_len: int = 128
  learning_rate: float = 3e-3
  seed: int = 0

  def __post_init__(self):
    if not is_pow2(self.page_size):
      raise ValueError(f"page_size={self.page_size} must be a power of two")
    if self.num_pages < 2:
      raise ValueError(f"num_pages={self.num_pages} must be >= 2 (page {NULL_PAGE} is reserved)")
    if not self.prefill_lengths or list(self.prefill_lengths) != sorted(set(self.prefill_lengths)):
      raise ValueError(f"prefill_lengths must be strictly increasing, got {self.prefill_lengths}")
    if list(self.chunk_lengths) != sorted(set(self.chunk_lengths)) or min(
        self.chunk_lengths, default=1) < 1:
      raise ValueError(f"chunk_lengths must be strictly increasing and positive, got"
                       f" {self.chunk_lengths}")
    if list(self.verify_lengths) != sorted(set(self.verify_lengths)) or min(
        self.verify_lengths, default=2) < 2:
      raise ValueError(f"verify_lengths must be strictly increasing and >= 2, got"
                       f" {self.verify_lengths}")
    if min(self.decode_batch, self.prefill_tokens, self.prefill_lengths[0]) < 1:
      raise ValueError("decode_batch, prefill_tokens and prefill_lengths must be positive")
    if self.kv_dtype not in KV_DTYPES:
      raise ValueError(f"kv_dtype={self.kv_dtype!r} must be one of {KV_DTYPES}")
    if self.train_steps < 0:
      raise ValueError(f"train_steps={self.train_steps} must be >= 0")

  def prefill_batch(self, length: int) -> int:
    return min(self.decode_batch, max(1, self.prefill_tokens // length))

  def extend_batch(self, length: int) -> int:
    return min(self.decode_batch, max(1, self.chunk_lengths[-1] // length))

  @classmethod
  def demo(cls) -> GenerativeExportConfig:
    return cls()

  @classmethod
  def tiny(cls) -> GenerativeExportConfig:
    """For tests: 64 pages of 8 (so a full decode batch of long sequences must preempt)."""
    return cls(page_size=8, num_pages=64, prefill_lengths=(16, 32, 64, 128), prefill_tokens=64,
               chunk_lengths=(16, 32), verify_lengths=(5,), decode_batch=8, train_steps=120,
               train_batch=16, train_seq_len=64, learning_rate=1e-2)


def train(model: Decoder, lines: list[str], config: GenerativeExportConfig,
          tokenizer: ByteTokenizer, *,
          progress: Callable[[str], None] | None = None) -> dict[str, float]:
  """Next-byte training on packed `BOS line EOS` windows; returns first/last loss and seconds.

  `progress` (default: the log) gets a line on the first and last step and at least every 5 s.
  """
  say = progress or (lambda msg: logger.info("%s", msg))
  stream = np.asarray([t for line in lines for t in tokenizer.encode(line, eos=True)], np.int32)
  n = config.train_seq_len + 1
  if len(stream) <= n:
    raise ValueError(f"corpus of {len(stream)} tokens is shorter than a window of {n}")
  rng = np.random.default_rng(config.seed)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(1, config.train_steps // 10), max(1, config.train_steps))
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(m):
      logits = m(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  start, losses = time.perf_counter(), []
  said = start
  say(f"training {config.train_steps} steps of {config.train_batch} x {config.train_seq_len}"
      " tokens (the first step compiles)")
  for i in range(config.train_steps):
    starts = rng.integers(0, len(stream) - n, config.train_batch)
    losses.append(float(step(model, optimizer, stream[starts[:, None] + np.arange(n)])))
    now = time.perf_counter()
    if i == 0 or i == config.train_steps - 1 or now - said >= 5.0:
      say(f"train step {i + 1}/{config.train_steps} loss {losses[-1]:.3f}"
          f" ({now - start:.0f}s)")
      said = now
  return {"steps": config.train_steps, "first_loss": losses[0] if losses else float("nan"),
          "final_loss": losses[-1] if losses else float("nan"),
          "seconds": round(time.perf_counter() - start, 2)}


def _spec(name: str, x: jax.ShapeDtypeStruct) -> TensorSpec:
  return TensorSpec(name, str(np.dtype(x.dtype)) if x.dtype != jnp.bfloat16 else "bfloat16",
                    tuple(x.shape), (None,) * len(x.shape))


def export_generative(
    model: Decoder,
    directory: str | os.PathLike[str],
    config: GenerativeExportConfig,
    *,
    name: str = "decoder",
    version: int = 1,
    tokenizer: ByteTokenizer = ByteTokenizer(),
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
  """Writes the bundle of `model` into `directory` (a `<repo>/<name>/<version>` folder)."""
  mc = model.config
  _check_fits(mc, config, tokenizer)
  quant_extra: dict[str, Any] = {}
  if config.weights != "none":  # quantized Dense weights through the kernel dispatcher
    from export.awq import quantize_generate_weights
    model, quant_extra = quantize_generate_weights(
        model, config.weights, group_size=config.int4_group_size, seed=config.seed + 1)
  leaves, specs, rebuild = nnx_parts(model)
  param_structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  kv = cache_shapes(mc, num_pages=config.num_pages, page_size=config.page_size,
                    kv_dtype=config.kv_dtype)
  pages_per_seq = -(-mc.max_seq_len // config.page_size)
  entries, prefill_meta = _entries(rebuild, kv, config, pages_per_seq)
  extend_entries, extend_meta = chunk_entries(
      rebuild, kv, "extend", [(c, config.extend_batch(c)) for c in config.chunk_lengths],
      pages_per_seq)
  verify, verify_meta = chunk_entries(
      rebuild, kv, "verify", [(c, config.decode_batch) for c in config.verify_lengths],
      pages_per_seq)
  entries += extend_entries + verify
  signatures, artifacts = _export_entries(entries, param_structs, config.platforms)
  batch_buckets, seq_buckets = (config.decode_batch,), tuple(config.prefill_lengths)
  manifest = Manifest(
      name=name, version=version, kind="generate", jax_version=jax.__version__,
      signatures=signatures, params=tuple(specs), batch_buckets=batch_buckets,
      seq_buckets=seq_buckets, quantization=config.weights,
      code_hash=bundle_lib.compute_code_hash(artifacts, specs, batch_buckets, seq_buckets),
      extra={**_generate_extra(mc, config, kv, pages_per_seq, prefill_meta, tokenizer),
             "extend": extend_meta, "verify": verify_meta, **quant_extra, **(extra or {})})
  return bundle_lib.write_bundle(directory, manifest, leaves, artifacts)


def _check_fits(mc: DecoderConfig, config: GenerativeExportConfig,
                tokenizer: ByteTokenizer) -> None:
  """The prefill buckets must cover the model's longest sequence, its vocab the tokenizer's."""
  if config.prefill_lengths[-1] < mc.max_seq_len:
    raise ValueError(f"the largest prefill length {config.prefill_lengths[-1]} must cover"
                     f" max_seq_len={mc.max_seq_len} (a preempted sequence is recomputed whole)")
  if tokenizer.vocab_size > mc.vocab_size:
    raise ValueError(f"tokenizer needs {tokenizer.vocab_size} ids, the model has {mc.vocab_size}")


_Entry = tuple[str, Callable[..., Any], dict[str, jax.ShapeDtypeStruct]]


def _entries(rebuild: Callable[[list[Any]], Any], kv: dict[str, tuple[tuple[int, ...], str]],
             config: GenerativeExportConfig, pages_per_seq: int
             ) -> tuple[list[_Entry], list[dict[str, Any]]]:
  """(signature name, fn, abstract inputs) of every prefill bucket and the decode; prefill meta."""
  cache_structs = {k: jax.ShapeDtypeStruct(s, jnp.dtype(d)) for k, (s, d) in kv.items()}
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

  def prefill_fn(params, inputs):
    cache = {k: inputs[k] for k in kv}
    logits, cache = rebuild(list(params)).prefill(
        inputs["tokens"], inputs["lengths"], inputs["page_table"], cache)
    return {"logits": logits, **cache}

  def decode_fn(params, inputs):
    cache = {k: inputs[k] for k in kv}
    logits, cache = rebuild(list(params)).decode_step(
        inputs["tokens"], inputs["positions"], inputs["page_table"], inputs["lengths"], cache)
    return {"logits": logits, **cache}

  entries: list[_Entry] = []
  prefill_meta = []
  for t in config.prefill_lengths:
    b = config.prefill_batch(t)
    entries.append((f"prefill_{t}", prefill_fn, {
        "tokens": i32(b, t), "lengths": i32(b), "page_table": i32(b, pages_per_seq),
        **cache_structs}))
    prefill_meta.append({"length": t, "batch": b, "signature": f"prefill_{t}"})
  b = config.decode_batch
  entries.append(("decode", decode_fn, {
      "tokens": i32(b), "positions": i32(b), "page_table": i32(b, pages_per_seq),
      "lengths": i32(b), **cache_structs}))
  return entries, prefill_meta


def _export_entries(entries: list[_Entry], param_structs: list[jax.ShapeDtypeStruct],
                    platforms: tuple[str, ...]
                    ) -> tuple[dict[str, Signature], dict[str, bytes]]:
  """One artifact per entry and platform: (signatures, artifact file name -> bytes)."""
  artifacts: dict[str, bytes] = {}
  signatures: dict[str, Signature] = {}
  for sig_name, fn, in_structs in entries:
    out_structs = jax.eval_shape(fn, param_structs, in_structs)
    files = {}
    for platform in platforms:
      exp = jax.export.export(jax.jit(fn), platforms=(platform,),
                              disabled_checks=disabled_checks(platform))(param_structs, in_structs)
      files[platform] = f"{sig_name}.{platform}.jaxexport"
      artifacts[files[platform]] = bytes(exp.serialize())
    signatures[sig_name] = Signature(
        sig_name, tuple(_spec(k, v) for k, v in in_structs.items()),
        tuple(_spec(k, v) for k, v in out_structs.items()), files)
    logger.info("exported %s for %s", sig_name, platforms)
  return signatures, artifacts


def _generate_extra(mc: DecoderConfig, config: GenerativeExportConfig,
                    kv: dict[str, tuple[tuple[int, ...], str]], pages_per_seq: int,
                    prefill_meta: list[dict[str, Any]], tokenizer: ByteTokenizer
                    ) -> dict[str, Any]:
  """`manifest.extra` of a generate bundle: cache geometry, buckets, tokenizer, model config."""
  return {
      "page_size": config.page_size,
      "num_pages": config.num_pages,
      "null_page": NULL_PAGE,
      "pages_per_seq": pages_per_seq,
      "max_seq_len": mc.max_seq_len,
      "prefill": prefill_meta,
      "decode": {"batch": config.decode_batch, "signature": "decode"},
      "kv_dtype": config.kv_dtype,
      "kv_cache": {k: {"shape": list(s), "dtype": d, "logical_axes": list(CACHE_AXES[:len(s)])}
                   for k, (s, d) in kv.items()},
      "vocab_size": mc.vocab_size,
      "bos_id": tokenizer.bos_id,
      "eos_id": tokenizer.eos_id,
      "pad_id": tokenizer.pad_id,
      "tokenizer": tokenizer.spec(),
      "model": mc.to_json(),
  }


def build_bundle(
    directory: str | os.PathLike[str],
    *,
    model_config: DecoderConfig | None = None,
    config: GenerativeExportConfig | None = None,
    name: str = "decoder",
    version: int = 1,
) -> pathlib.Path:
  """Builds the model from a fixed seed, trains it on the ad corpus, exports it."""
  model_config = model_config or DecoderConfig.demo()
  config = config or GenerativeExportConfig.demo()
  tokenizer = ByteTokenizer()
  model = Decoder(model_config, rngs=nnx.Rngs(config.seed))
  training = train(model, ad_corpus(seed=config.seed), config, tokenizer) if config.train_steps else {}
  return export_generative(model, directory, config, name=name, version=version,
                           tokenizer=tokenizer, extra={"training": training})


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--repo", default="model_repo", help="repository root; writes <repo>/<name>/<version>")
  p.add_argument("--name", default="decoder")
  p.add_argument("--version", type=int, default=1)
  p.add_argument("--preset", choices=("demo", "tiny", "draft"), default="demo",
                 help="draft: a 1-layer LM with the demo's geometry (speculative decoding)")
  p.add_argument("--train-steps", type=int, default=None)
  p.add_argument("--kv-dtype", choices=KV_DTYPES, default="float32")
  p.add_argument("--platforms", default="cpu", help="comma-separated, e.g. cpu,cuda")
  p.add_argument("--weights", default="none", help="dense (MLP, head) weights: none, int8, fp8,"
                 " awq (int4, activation-aware scales) or int4 (round to nearest); see export/awq.py")
  p.add_argument("--group-size", type=int, default=128, help="int4 group size along K")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  config = getattr(GenerativeExportConfig, "demo" if args.preset == "draft" else args.preset)()
  config = dataclasses.replace(
      config, kv_dtype=args.kv_dtype, platforms=tuple(args.platforms.split(",")),
      weights=args.weights, int4_group_size=args.group_size,
      train_steps=config.train_steps if args.train_steps is None else args.train_steps)
  path = build_bundle(pathlib.Path(args.repo) / args.name / str(args.version),
                      model_config=getattr(DecoderConfig, args.preset)(), config=config,
                      name=args.name, version=args.version)
  logger.info("bundle written to %s", path)


if __name__ == "__main__":
  main()
