"""Quality of a (quantized) decoder LM against its float32 original: perplexity and greedy agreement.

Held-out text is the synthetic ad corpus with its own seed (training uses the export seed, AWQ
calibration `AwqConfig.seed`), packed into windows like the calibration set.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

HELD_OUT_SEED = 2


def perplexity(model: Any, tokens: np.ndarray, *, batch: int = 8) -> float:
  """exp(mean next-token NLL) of `model` over windows tokens [n, T] (every position but the first)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def row_nll(state, window):  # [b, T] -> [b] summed NLL of positions 1..T-1
    logits = nnx.merge(graphdef, state)(window[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:]).sum(axis=1)

  total, count = 0.0, 0
  for i in range(0, len(tokens), batch):
    chunk = np.asarray(tokens[i:i + batch], np.int32)
    n = len(chunk)  # one compiled shape: a short last chunk is padded and its padding ignored
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    total += float(np.asarray(row_nll(state, padded))[:n].sum())
    count += n * (chunk.shape[1] - 1)
  return math.exp(total / count)


def top1_agreement(reference: Any, other: Any, tokens: np.ndarray, *, batch: int = 8) -> float:
  """Share of positions of tokens [n, T] where both models' next-token argmax is the same
  (teacher-forced: every position sees the same true prefix, so one divergence costs one token)."""
  fns = []
  for m in (reference, other):
    graphdef, state = nnx.split(m)
    fns.append((jax.jit(lambda st, w, g=graphdef: jnp.argmax(nnx.merge(g, st)(w), axis=-1)),
                state))
  same = total = 0
  for i in range(0, len(tokens), batch):
    chunk = np.asarray(tokens[i:i + batch], np.int32)
    a, b = (np.asarray(fn(state, chunk)) for fn, state in fns)
    same += int((a == b).sum())
    total += a.size
  return same / total


def greedy_agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
  """Share of generated positions whose token equals the reference's (free-running generations).

  Positions are compared index by index over the reference's length (a missing token counts as a
  mismatch), so one early divergence costs every later position of that prompt.
  """
  same = total = 0
  for ref, got in zip(reference, other, strict=True):
    total += len(ref)
    same += sum(1 for i, t in enumerate(ref) if i < len(got) and got[i] == t)
  return same / total if total else 1.0


def bytes_per_param(model: Any, quantized: Any) -> dict[str, float]:
  """Bytes per float parameter of `quantized` vs the float `model`: whole model and changed layers.

  "layers" counts only the params whose names differ between the two (the quantized layers and
  their scales and zeros) over the float params they replace.
  """
  def sizes(m):
    out = {}
    for path, var in nnx.iter_graph(m):
      if isinstance(var, nnx.Variable):
        value = var[...]
        out[path] = (int(np.prod(value.shape)), int(np.prod(value.shape))
                     * jnp.dtype(value.dtype).itemsize)
    return out

  f, q = sizes(model), sizes(quantized)
  f_only = [k for k in f if k not in q]
  q_only = [k for k in q if k not in f]
  params = sum(n for n, _ in f.values())
  layer_params = sum(f[k][0] for k in f_only)
  return {
      "model": sum(b for _, b in q.values()) / params,
      "layers": (sum(q[k][1] for k in q_only) / layer_params) if layer_params else 4.0,
      "float_params": params,
      "quantized_params": layer_params,
  }
