"""Writes the golden bundle (tests/golden/repo/golden/1) and its expected outputs (expected.npz).

    python tests/golden/make_golden.py

Run once, and again only on purpose (a deliberate format change, or a jax upgrade beyond
the StableHLO window): tests/golden/test_golden_bundle.py then checks that today's code
still loads and serves the checked-in bytes with the outputs saved here. The model is a
few hand-written arrays (no code from models/), so the bundle guards the format alone.
It covers: a multi-signature predict bundle (one served model per signature), sequence
signatures with one artifact per sequence bucket, an output with a sequence dimension,
a batch-only signature, logical axes on params, and int32 / float32 tensors.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a bare checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import export  # noqa: E402

BATCH, SEQ = (1, 4), (4, 8)
VOCAB, EMBED, OUT = 16, 4, 3


def params() -> dict[str, jax.Array]:
  """Small exact-ish numbers (multiples of 1/8) so outputs are easy to eyeball."""
  rng = np.random.default_rng(2026)
  return {"embed": jnp.asarray(rng.integers(-8, 9, (VOCAB, EMBED)) / 8, jnp.float32),
          "w": jnp.asarray(rng.integers(-8, 9, (EMBED, OUT)) / 8, jnp.float32),
          "b": jnp.asarray(rng.integers(-8, 9, (OUT,)) / 8, jnp.float32)}


LOGICAL_AXES = {"embed": ("vocab", "embed"), "w": ("embed", "mlp"), "b": ("mlp",)}


def per_token(p, tokens, lengths):
  """tokens [B, S], lengths [B] -> h [B, S, OUT] (zero past each length)."""
  h = jnp.take(p["embed"], jnp.mod(tokens, VOCAB), axis=0) @ p["w"] + p["b"]
  valid = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return {"h": jnp.where(valid[..., None], h, 0.0)}


def pooled(p, tokens, lengths):
  """Mean of per_token over valid positions -> v [B, OUT], and the count n [B] int32."""
  h = per_token(p, tokens, lengths)["h"]
  n = jnp.clip(lengths, 0, tokens.shape[1])
  return {"v": h.sum(axis=1) / jnp.maximum(n, 1)[:, None].astype(jnp.float32), "n": n}


def affine(p, x):
  """x [B, EMBED] -> y [B, OUT] (a batch-only signature)."""
  return {"y": x @ p["w"] + p["b"]}


def inputs() -> dict[str, dict[str, np.ndarray]]:
  """The requests the test replays, per served model (lengths 1..8 and 1..5 rows)."""
  rng = np.random.default_rng(7)
  out = {}
  for name, (rows, length) in {"per_token": (3, 6), "pooled": (5, 8)}.items():
    out[name] = {"tokens": rng.integers(0, 40, (rows, length)).astype(np.int32),
                 "lengths": rng.integers(1, length + 1, rows).astype(np.int32)}
  out["affine"] = {"x": (rng.integers(-8, 9, (2, EMBED)) / 8).astype(np.float32)}
  return out


def main() -> None:
  repo = HERE / "repo"
  shutil.rmtree(repo, ignore_errors=True)
  tokens = [export.Input("tokens", "int32", ("batch", "seq")),
            export.Input("lengths", "int32", ("batch",))]
  p = params()
  export.export_model(
      per_token, repository=repo, name="golden", version=1, params=p,
      logical_axes=LOGICAL_AXES,
      inputs={"per_token": tokens, "pooled": tokens,
              "affine": [export.Input("x", "float32", ("batch", EMBED))]},
      signatures={"per_token": lambda q, **kw: per_token(q, **kw),
                  "pooled": lambda q, **kw: pooled(q, **kw),
                  "affine": lambda q, **kw: affine(q, **kw)},
      config=export.ExportConfig(batch_buckets=BATCH, seq_buckets=SEQ,
                                 signature_suffixes={"per_token": "tokens"}),
      extra={"purpose": "format regression guard; see tests/golden/make_golden.py"})
  arrays = {}
  fns = {"per_token": per_token, "pooled": pooled, "affine": affine}
  for sig, ins in inputs().items():
    outs = fns[sig](p, **{k: jnp.asarray(v) for k, v in ins.items()})
    arrays.update({f"{sig}/in/{k}": v for k, v in ins.items()})
    arrays.update({f"{sig}/out/{k}": np.asarray(v) for k, v in outs.items()})
  np.savez(HERE / "expected.npz", **arrays)
  print(f"wrote {repo} and {HERE / 'expected.npz'} (jax {jax.__version__})")


if __name__ == "__main__":
  main()
