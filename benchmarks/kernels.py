"""Times our kernels (impl="auto": Triton kernel on a GPU, reference on CPU) against plain XLA jnp.

    python benchmarks/kernels.py [--quick] [--out DIR] [--reps N] [--tune]

Shapes are the ads-serving ones: decode matmuls (M = 1..16, 4096 x 4096), dense layers (batch
256..4096, 512..1024 wide), embedding bags (26 features x 32 ids, 100k x 64 tables), and rows for
flash/paged attention. Prints a table (time, GB/s, TFLOP/s), writes results.json and kernels.png to
--out. --tune (GPU only) times candidate block sizes for all four kernel families (quantized matmul,
embedding bag, flash and paged attention) and rewrites their rows of pallas_kernels/tuned_block_sizes.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a bare checkout
# pylint: disable=g-import-not-at-top
from pallas_kernels import quantize, tuned_block_sizes as tbs
from pallas_kernels.common import ANY, MASK_VALUE, device_kind
from pallas_kernels.embedding_bag import BlockSizes as BagBlockSizes
from pallas_kernels.embedding_bag import embedding_bag_multi
from pallas_kernels.flash_attention import BlockSizes as FlashBlockSizes
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import BlockSizes as PagedBlockSizes
from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.quantized_matmul import MODES
from pallas_kernels.quantized_matmul import BlockSizes as MatmulBlockSizes
from pallas_kernels.quantized_matmul import quantized_matmul
# pylint: enable=g-import-not-at-top


@dataclasses.dataclass(frozen=True)
class Case:
  """One timed call: fn(*args), with the bytes it must move and the flops it must do."""

  op: str
  shape: str
  variant: str  # "auto" (our op) or "jnp" (plain XLA)
  fn: Callable[..., Any]
  args: tuple[Any, ...]
  bytes_moved: int
  flops: int


@dataclasses.dataclass(frozen=True)
class Result:
  op: str
  shape: str
  variant: str
  ms: float
  gb_s: float
  tflop_s: float
  error: str = ""


def _progress(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _nbytes(*arrays: jax.Array) -> int:
  return sum(int(a.size) * a.dtype.itemsize for a in arrays)


def time_call(fn: Callable[..., Any], args: tuple[Any, ...], reps: int) -> float:
  """Median ms per fn(*args) after a compile-and-warm-up call.

  On a GPU one timed sample is INNER calls chained inside one jitted loop (each call's input
  depends on the previous output, so XLA can neither hoist nor drop it): a single call from
  Python costs ~0.1 ms of dispatch, more than most of these kernels take. On CPU, plain calls.
  """
  inner = INNER if jax.default_backend() == "gpu" else 1
  timed = _chained(fn, args, inner) if inner > 1 else fn
  jax.block_until_ready(timed(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(timed(*args))
    times.append((time.perf_counter() - start) * 1e3 / inner)
  return statistics.median(times)


INNER = 50  # calls per timed sample on a GPU


def _chained(fn: Callable[..., Any], args: tuple[Any, ...], inner: int) -> Callable[..., Any]:
  """jit(args -> inner dependent calls of fn), the dependency threaded through the smallest
  argument (adding to a big table would time a copy of the table)."""
  pos = min(range(len(args)), key=lambda i: args[i].size)

  def chained(*a):
    def body(_, carry):
      a_i = list(a)
      a_i[pos] = a[pos] + (carry * 0).astype(a[pos].dtype)  # float x*0 is never folded
      out = fn(*a_i)
      return jnp.ravel(out)[0].astype(jnp.float32)
    return jax.lax.fori_loop(0, inner, body, jnp.float32(0))

  return jax.jit(chained)


# ------------------------------------------------------------------------------- quantized matmul
def _dequant_matmul(x, w_q, w_scale):
  """What a model writes without the op: dequantize the whole weight, then one XLA dot."""
  return jnp.dot(x, (w_q.astype(jnp.float32) * w_scale[None, :]).astype(x.dtype))


def matmul_cases(quick: bool, key: jax.Array) -> list[Case]:
  decode = [(m, 4096, 4096) for m in ((1, 16) if quick else (1, 4, 8, 16))]
  dense = [(b, 512, 1024) for b in ((256, 1024) if quick else (256, 1024, 4096))]
  if not quick:
    dense += [(b, 1024, 1024) for b in (256, 4096)]
  modes = ("w8a16", "w8a8") if quick else MODES
  cases = []
  for m, k, n in decode + dense:
    kx, kw = jax.random.split(jax.random.fold_in(key, m * k + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32)
    for mode in modes:
      w_q, w_scale = (quantize.quantize_fp8_per_channel(w) if mode == "fp8"
                      else quantize.quantize_int8_per_channel(w))
      shape = f"{mode} M={m} K={k} N={n}"
      moved = _nbytes(x, w_q, w_scale) + m * n * x.dtype.itemsize
      fn = jax.jit(functools.partial(quantized_matmul, mode=mode, impl="auto"))
      cases.append(Case("quantized_matmul", shape, "auto", fn, (x, w_q, w_scale), moved,
                        2 * m * k * n))
      cases.append(Case("quantized_matmul", shape, "jnp", jax.jit(_dequant_matmul),
                        (x, w_q, w_scale), moved, 2 * m * k * n))
  return cases


# --------------------------------------------------------------------------------- embedding bag
def _jnp_bags(tables, ids):
  """Plain jnp: gather [batch, features, bag, dim], mask the -1s, sum."""
  valid = ids >= 0
  rows = jnp.where(valid, ids % tables.shape[1], 0)
  gathered = tables[jnp.arange(tables.shape[0])[None, :, None], rows]
  return jnp.where(valid[..., None], gathered.astype(jnp.float32), 0).sum(2).astype(tables.dtype)


def _jnp_bags_quantized(tables, ids, scales, offsets):
  valid = ids >= 0
  rows = jnp.where(valid, ids % tables.shape[1], 0)
  f = jnp.arange(tables.shape[0])[None, :, None]
  vals = tables[f, rows].astype(jnp.float32) * scales[f, rows][..., None] + offsets[f, rows][
      ..., None]
  return jnp.where(valid[..., None], vals, 0).sum(2)


def embedding_cases(quick: bool, key: jax.Array) -> list[Case]:
  features, bag, rows, dim = 26, 32, 100_000, 64
  kt, ki = jax.random.split(key)
  tables = jax.random.normal(kt, (features, rows, dim), jnp.float32)
  q, s, o = jax.vmap(quantize.quantize_rows_int8)(tables)  # [features, rows(, dim)]
  cases = []
  for batch in ((256, 1024) if quick else (256, 1024, 4096)):
    ids = jax.random.randint(jax.random.fold_in(ki, batch), (batch, features, bag), -1, 2 * rows)
    adds = batch * features * bag * dim
    for name, args, jnp_fn in (("float32", (tables, ids), _jnp_bags),
                               ("uint8", (q, ids, s, o), _jnp_bags_quantized)):
      itemsize = args[0].dtype.itemsize
      moved = batch * features * bag * (dim * itemsize + 4) + batch * features * dim * 4
      shape = f"{name} B={batch} F={features} bag={bag} {rows}x{dim}"
      if name == "uint8":
        fn = jax.jit(lambda t, i, sc, of: embedding_bag_multi(t, i, scales=sc, offsets=of))
      else:
        fn = jax.jit(embedding_bag_multi)
      cases.append(Case("embedding_bag_multi", shape, "auto", fn, args, moved, adds))
      cases.append(Case("embedding_bag_multi", shape, "jnp", jax.jit(jnp_fn), args, moved, adds))
  return cases


# ------------------------------------------------------------------------------------- attention
def _jnp_attention(q, k, v, causal):
  """Plain jnp attention with grouped kv heads; float32 softmax."""
  groups = q.shape[1] // k.shape[1]
  k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(q.shape[-1])
  if causal:
    mask = jnp.tril(jnp.ones((q.shape[2], k.shape[2]), bool))
    logits = jnp.where(mask, logits, MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def _jnp_paged(q, k_pages, v_pages, page_table, lengths):
  """Plain jnp decode attention: gather the pages into a dense cache, mask past each length."""
  kv_heads, _, page_size, head_dim = k_pages.shape
  batch, heads, _ = q.shape
  k = k_pages[:, page_table].reshape(kv_heads, batch, -1, head_dim).swapaxes(0, 1)
  v = v_pages[:, page_table].reshape(kv_heads, batch, -1, head_dim).swapaxes(0, 1)
  qg = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bkgd,bksd->bkgs", qg, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(head_dim)
  valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]
  logits = jnp.where(valid[:, None, None, :], logits, MASK_VALUE)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgs,bksd->bkgd", weights, v).reshape(q.shape)


def _flash_inputs(key, batch, heads, kv_heads, seq, head_dim) -> tuple[jax.Array, ...]:
  """(q, k, v) bfloat16: q [batch, heads, seq, head_dim], k and v [batch, kv_heads, seq, head_dim]."""
  kq, kk, kv = jax.random.split(jax.random.fold_in(key, seq), 3)
  return tuple(jax.random.normal(k_i, (batch, h, seq, head_dim), jnp.bfloat16)
               for k_i, h in ((kq, heads), (kk, kv_heads), (kv, kv_heads)))


def _paged_inputs(key, batch, heads, kv_heads, head_dim, page_size, pages_per_seq,
                  cache_dtype=jnp.bfloat16) -> tuple[jax.Array, ...]:
  """(q, k_pages, v_pages, page_table, lengths), then (k_scale, v_scale) for an int8 cache."""
  kq, kk, kv, kl = jax.random.split(jax.random.fold_in(key, batch), 4)
  num_pages = batch * pages_per_seq
  pages_shape = (kv_heads, num_pages, page_size, head_dim)
  q = jax.random.normal(kq, (batch, heads, head_dim), jnp.bfloat16)
  if jnp.dtype(cache_dtype) == jnp.int8:
    k_pages, v_pages = (jax.random.randint(k_i, pages_shape, -127, 128, jnp.int8) for k_i in (kk, kv))
    scales = (jax.random.uniform(k_i, pages_shape[:3], jnp.float32, 0.005, 0.02) for k_i in (kk, kv))
  else:
    k_pages, v_pages = (jax.random.normal(k_i, pages_shape, cache_dtype) for k_i in (kk, kv))
    scales = ()
  page_table = jax.random.permutation(kl, num_pages).reshape(batch, pages_per_seq).astype(jnp.int32)
  max_len = pages_per_seq * page_size
  lengths = jax.random.randint(kl, (batch,), max_len // 2, max_len + 1, jnp.int32)
  return (q, k_pages, v_pages, page_table, lengths, *scales)


def attention_cases(quick: bool, key: jax.Array) -> list[Case]:
  cases = []
  for batch, heads, kv_heads, seq, head_dim in (
      ((1, 8, 2, 256, 64),) if quick else ((4, 16, 4, 1024, 128), (16, 8, 8, 512, 64))):
    q, k, v = args = _flash_inputs(key, batch, heads, kv_heads, seq, head_dim)
    shape = f"causal B={batch} H={heads}/{kv_heads} S={seq} D={head_dim}"
    moved = _nbytes(q, k, v, q)
    flops = 2 * batch * heads * seq * seq * head_dim  # 4*b*h*s*s*d halved by the causal mask
    for variant, fn in (("auto", flash_attention), ("jnp", _jnp_attention)):
      cases.append(Case("flash_attention", shape, variant,
                        jax.jit(functools.partial(fn, causal=True)), args, moved, flops))
  for batch, heads, kv_heads, head_dim, page_size, pages_per_seq in (
      ((8, 8, 2, 64, 16, 32),) if quick else ((32, 32, 8, 128, 16, 128),)):
    args = _paged_inputs(key, batch, heads, kv_heads, head_dim, page_size, pages_per_seq)
    mean_len = float(np.mean(np.asarray(args[4])))
    max_len = pages_per_seq * page_size
    shape = f"B={batch} H={heads}/{kv_heads} D={head_dim} page={page_size} len<={max_len}"
    moved = int(2 * batch * mean_len * kv_heads * head_dim * 2) + 2 * _nbytes(args[0])
    flops = int(4 * batch * heads * mean_len * head_dim)
    for variant, fn in (("auto", paged_attention), ("jnp", _jnp_paged)):
      cases.append(Case("paged_attention", shape, variant, jax.jit(fn), args, moved, flops))
  return cases


# ------------------------------------------------------------------------------------------ tune
def _paged_scaled(q, k_pages, v_pages, page_table, lengths, k_scale=None, v_scale=None, **kwargs):
  """paged_attention with the int8 scales positional, so the timing loop can pass them."""
  return paged_attention(q, k_pages, v_pages, page_table, lengths, k_scale=k_scale,
                         v_scale=v_scale, **kwargs)


def tune_jobs(quick: bool, key: jax.Array) -> list[tbs.TuneJob]:
  """The table rows `--tune` measures, all four kernel families (quick: one row per family)."""
  jobs, pick = [], (lambda rows: rows[:1] if quick else rows)
  for m, k, n in pick(((16, 4096, 4096), (256, 512, 1024), (4096, 1024, 1024))):
    def matmul_args(m=m, k=k, n=n):
      w_q, w_scale = quantize.quantize_int8_per_channel(jax.random.normal(key, (k, n)))
      return jax.random.normal(key, (m, k), jnp.bfloat16), w_q, w_scale
    jobs += [tbs.TuneJob("quantized_matmul", tbs.matmul_shape_class(m, k, n), f"{mode}:bfloat16",
                         MatmulBlockSizes, quantized_matmul, matmul_args, dict(mode=mode))
             for mode in ("w8a16", "w8a8")]
  jobs.append(tbs.TuneJob(
      "embedding_bag", tbs.embedding_shape_class(1024, 32, 64), "float32", BagBlockSizes,
      embedding_bag_multi, lambda: (jax.random.normal(key, (26, 100_000, 64), jnp.float32),
                                    jax.random.randint(key, (1024, 26, 32), -1, 200_000))))
  for seq, d in pick(((256, 64), (64, 64), (1024, 64), (4096, 64), (1024, 128), (4096, 128))):
    # Up to 256 keys: the bidirectional encoder; longer: causal decoder prefill.
    jobs.append(tbs.TuneJob(
        "flash_attention", tbs.flash_shape_class(seq, d), "bfloat16", FlashBlockSizes,
        flash_attention, functools.partial(_flash_inputs, key, 4, 16, 4, seq, d),
        dict(causal=seq > 256)))
  for d, cache in pick(((128, "bfloat16"), (64, "bfloat16"), (64, "int8"), (128, "int8"))):
    jobs.append(tbs.TuneJob(
        "paged_attention", tbs.paged_shape_class(16, d), cache, PagedBlockSizes, _paged_scaled,
        functools.partial(_paged_inputs, key, 32, 32, 8, d, 16, 128, cache)))
  return jobs


# ------------------------------------------------------------------------------------------ main
def run(cases: list[Case], reps: int) -> list[Result]:
  results = []
  for i, case in enumerate(cases, 1):
    _progress(f"[{i}/{len(cases)}] {case.op} {case.shape} ({case.variant}) ...")
    try:
      ms = time_call(case.fn, case.args, reps)
    except Exception as e:  # pylint: disable=broad-except
      _progress(f"    failed: {type(e).__name__}: {e}")
      results.append(Result(case.op, case.shape, case.variant, math.nan, math.nan, math.nan,
                            f"{type(e).__name__}: {e}"[:300]))
      continue
    results.append(Result(case.op, case.shape, case.variant, ms,
                          case.bytes_moved / ms / 1e6, case.flops / ms / 1e9))
    _progress(f"    {ms:.3f} ms")
  return results


def format_table(results: list[Result]) -> str:
  header = f"{'op':<20} {'shape':<44} {'impl':<5} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'vs jnp':>7}"
  lines = [header, "-" * len(header)]
  jnp_ms = {(r.op, r.shape): r.ms for r in results if r.variant == "jnp"}
  for r in results:
    speedup = jnp_ms.get((r.op, r.shape), math.nan) / r.ms if r.variant == "auto" else math.nan
    lines.append(f"{r.op:<20} {r.shape:<44} {r.variant:<5} {r.ms:>9.3f} {r.gb_s:>8.1f} "
                 f"{r.tflop_s:>8.3f} {'' if math.isnan(speedup) else f'{speedup:.2f}x':>7}")
  return "\n".join(lines)


def plot(results: list[Result], path: pathlib.Path, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = list(dict.fromkeys(f"{r.op}\n{r.shape}" for r in results))
  by = {(f"{r.op}\n{r.shape}", r.variant): r.ms for r in results}
  y = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(11, 0.45 * len(labels) + 1.5))
  for offset, variant in ((-0.2, "auto"), (0.2, "jnp")):
    ax.barh(y + offset, [by.get((label, variant), np.nan) for label in labels], height=0.4,
            label="ours (impl=auto)" if variant == "auto" else "plain XLA jnp")
  ax.set_yticks(y, labels, fontsize=7)
  ax.invert_yaxis()
  ax.set_xscale("log")
  ax.set_xlabel("ms per call (median, log scale)")
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
  parser.add_argument("--out", default="bench_out/kernels", help="folder for JSON and PNG")
  parser.add_argument("--reps", type=int, default=None, help="timed calls per case")
  parser.add_argument("--tune", action="store_true",
                      help="GPU only: time block-size candidates of all four kernel families and "
                      "rewrite their tuned-table rows (with --quick: one row per family)")
  args = parser.parse_args(argv)
  reps = args.reps or (3 if args.quick else 20)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  key = jax.random.key(0)
  backend, device = jax.default_backend(), device_kind()
  where = f"{backend} ({'no GPU' if device == ANY else device})"
  _progress(f"backend {where}, jax {jax.__version__}, reps {reps}")
  if args.tune and backend != "gpu":
    _progress("--tune needs a GPU (impl='pallas' only interprets on CPU); skipped")
  elif args.tune:
    time_ms = lambda fn, fn_args: time_call(fn, fn_args, reps)
    entries = tbs.tune(tune_jobs(args.quick, key), device, time_ms, progress=_progress)
    _progress(f"rewrote {tbs.rewrite_table(entries)}")

  cases = []
  for make in (matmul_cases, embedding_cases, attention_cases):
    _progress(f"building {make.__name__} ...")
    cases += make(args.quick, key)
  start = time.perf_counter()
  results = run(cases, reps)
  table = format_table(results)
  print(f"\nbackend {where}; impl=auto runs "
        f"{'the Triton kernels' if backend == 'gpu' else 'the jnp references (no GPU)'}\n")
  print(table)
  meta = dict(backend=backend, device_kind=device, jax=jax.__version__, quick=args.quick,
              reps=reps, calls_per_sample=INNER if backend == "gpu" else 1,
              python=platform.python_version(), seconds=time.perf_counter() - start)
  (out / "results.json").write_text(json.dumps(
      dict(meta=meta, results=[dataclasses.asdict(r) for r in results]), indent=1))
  plot(results, out / "kernels.png", f"kernels on {where}")
  _progress(f"wrote {out / 'results.json'} and {out / 'kernels.png'}")
  return 0 if all(not r.error for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
