"""Trains the demo LM once and writes its weights to demo/weights/lm.npz (see demo/weights.py).

The run is the one a first `xlaserve serve` would otherwise do (DecoderConfig.demo(),
GenerativeExportConfig.demo(): seeded init, seeded batches of the seeded ad corpus), so the
result is a function of the code and the JAX/XLA version: on the same versions it reproduces the
shipped int8 weights (`--check` compares, without writing). About 2 minutes on 2 CPU cores.

Run: `python tools/make_demo_weights.py [--out demo/weights/lm.npz] [--check]`
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _say(msg: str) -> None:
  print(f"[make_demo_weights {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def held_out_loss(model, lines: list[str], *, windows: int = 64, seq_len: int = 128) -> float:
  """Mean next-byte cross-entropy on `windows` fixed windows of `lines` (a disjoint corpus)."""
  import jax.numpy as jnp
  import numpy as np
  import optax

  from models.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  stream = np.asarray([t for line in lines for t in tok.encode(line, eos=True)], np.int32)
  starts = np.linspace(0, len(stream) - seq_len - 2, windows).astype(int)
  batch = jnp.asarray(stream[starts[:, None] + np.arange(seq_len + 1)])
  logits = model(batch[:, :-1])
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean())


def quality(trained, shipped) -> dict[str, float | int]:
  """How much the int8 rows cost: held-out loss of both, and greedy agreement on the prompts."""
  from demo.weights import reference_outputs
  from export.generative import ad_corpus

  lines = ad_corpus(num_lines=400, seed=1)
  ref_f32, ref_int8 = reference_outputs(trained), reference_outputs(shipped)
  same = sum(int((ref_f32[k] == ref_int8[k]).all()) for k in ref_f32 if k.startswith("tokens."))
  return {"held_out_loss_float32": round(held_out_loss(trained, lines), 4),
          "held_out_loss_shipped": round(held_out_loss(shipped, lines), 4),
          "greedy_prompts_identical": same,
          "greedy_prompts": sum(k.startswith("tokens.") for k in ref_f32)}


def make(out: pathlib.Path) -> dict:
  """Trains the demo LM, reports what the int8 rows cost, writes `out`; returns its metadata."""
  from flax import nnx

  from demo.weights import pack, save_lm, train_lm, unpack_into
  from export.generative import GenerativeExportConfig
  from models.decoder import Decoder, DecoderConfig

  model_config, config = DecoderConfig.demo(), GenerativeExportConfig.demo()
  model, training = train_lm(model_config, config, _say)
  shipped = Decoder(model_config, rngs=nnx.Rngs(0))
  unpack_into(shipped, pack(model))
  q = quality(model, shipped)
  _say(f"int8 rows vs float32: {q}")
  return save_lm(out, model, config, training, quality=q)


def compare(shipped: pathlib.Path, fresh: pathlib.Path) -> list[str]:
  """What differs between two weights files (int8 values by more than one step, scales, recipe)."""
  import numpy as np

  from demo.weights import read_lm

  (meta_a, a), (meta_b, b) = read_lm(shipped), read_lm(fresh)
  problems = [] if meta_a["recipe_key"] == meta_b["recipe_key"] else [
      f"recipe {meta_a['recipe_key']} != {meta_b['recipe_key']}"]
  for name in sorted(n for n in set(a) | set(b) if not n.startswith("reference.")):
    if name not in a or name not in b:
      problems.append(f"{name}: only in one file")
      continue
    x, y = a[name].astype(np.float64), b[name].astype(np.float64)
    if x.shape != y.shape:
      problems.append(f"{name}: shape {x.shape} vs {y.shape}")
    elif name.endswith(".q") and np.abs(x - y).max() > 1:
      problems.append(f"{name}: int8 values differ by up to {np.abs(x - y).max():.0f} steps")
    elif not name.endswith(".q") and not np.allclose(x, y, rtol=1e-3, atol=1e-6):
      problems.append(f"{name}: differs by up to {np.abs(x - y).max():.3g}")
  return problems


def main(argv: list[str] | None = None) -> int:
  from demo.weights import LM_WEIGHTS

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", type=pathlib.Path, default=LM_WEIGHTS)
  p.add_argument("--check", action="store_true",
                 help="train into a temporary file and compare it with --out instead of writing")
  args = p.parse_args(argv)
  if not args.check:
    meta = make(args.out)
    _say(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, recipe {meta['recipe_key']})")
    return 0
  with tempfile.TemporaryDirectory() as tmp:
    fresh = pathlib.Path(tmp) / "lm.npz"
    make(fresh)
    problems = compare(args.out, fresh)
  for line in problems:
    _say(f"DIFFERS: {line}")
  _say("matches the shipped weights" if not problems else f"{len(problems)} differences")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
