"""Activation-aware int4 weight quantization (AWQ) of the decoder LM's dense layers.

Following mit-han-lab/llm-awq (`auto_scale.py`): run the float decoder over a small calibration
set of generated ad text, record each quantized layer's input, and per group of layers that share
an input grid-search the exponent alpha of per-input-channel scales s = mean|x|^alpha (normalized
so sqrt(max(s) min(s)) = 1) that minimises the group's output error with int4 weights:
||x W - (x / s) Q(diag(s) W)||^2, for gate/up measured at the MLP's output. The 1/s is folded into the op before (exact in float), so
serving costs nothing extra: the MLP's gate and up rows scale with `mlp_norm`, the down rows with
the up layer's columns (per-column scaling commutes with per-(group, column) int4 quantization),
an untied head with `final_norm`. Then every such layer becomes a `models.int4_dense.Int4Dense`.
alpha = 0 (s = 1) is in the grid, so `search=False` is plain round-to-nearest (RTN) int4.
Deterministic: numpy/jnp on fixed inputs. The attention projections stay float (they are einsum
params, not `models.layers.Dense`, the same as for the int8/fp8 export path).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.int4_dense import Int4Dense
from models.layers import Dense
from models.tokenizer import ByteTokenizer
from pallas_kernels.quantize_int4 import check_group_size, fake_quantize_int4

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class AwqConfig:
  """Calibration set, search grid and int4 group size; `search=False` gives plain RTN int4."""

  group_size: int = 128
  grid: int = 20  # alphas 0, 1/grid, ..., (grid-1)/grid (llm-awq's n_grid)
  calibration_lines: int = 128  # ad lines, packed into windows of seq_len tokens
  seq_len: int = 128
  max_rows: int = 2048  # calibration tokens per layer used in the error search
  seed: int = 1  # corpus seed; the training corpus uses the export seed (0), held-out text 2
  search: bool = True

  def __post_init__(self):
    check_group_size(self.group_size)
    if self.grid < 1 or self.calibration_lines < 1 or self.seq_len < 2 or self.max_rows < 1:
      raise ValueError("grid, calibration_lines, max_rows must be >= 1 and seq_len >= 2")


@dataclasses.dataclass(frozen=True, slots=True)
class LayerReport:
  """What the search chose for one group of layers sharing an input, and its calibration error."""

  name: str
  alpha: float
  error: float  # mean squared output error with the chosen scales
  rtn_error: float  # the same with s = 1 (round to nearest)


@dataclasses.dataclass(frozen=True)
class _Group:
  """Layers sharing one input and where their 1/s folds: ("norm", RMSNorm) or ("dense", Dense)."""

  name: str
  layers: tuple[Any, ...]
  fold: tuple[str, Any]
  sets: tuple[tuple[Any, str], ...]  # (parent, attribute) of each layer, to swap in Int4Dense
  down: Any = None  # gate+up: the MLP's down layer, whose output the search inspects


def calibration_tokens(lines: Sequence[str], seq_len: int,
                       tokenizer: ByteTokenizer = ByteTokenizer()) -> np.ndarray:
  """`BOS line EOS` streams packed into full windows [n, seq_len] int32 (the tail is dropped)."""
  stream = np.asarray([t for line in lines for t in tokenizer.encode(line, eos=True)], np.int32)
  n = len(stream) // seq_len
  if n < 1:
    raise ValueError(f"{len(stream)} tokens do not fill one window of {seq_len}")
  return stream[:n * seq_len].reshape(n, seq_len)


def _groups(model: Any) -> list[_Group]:
  """The decoder's quantizable dense layers, grouped by shared input (module objects of `model`)."""
  groups = []
  for i, block in enumerate(model.blocks):
    mlp = block.mlp
    groups.append(_Group(f"blocks/{i}/mlp/gate+up", (mlp.gate, mlp.up), ("norm", block.mlp_norm),
                         ((mlp, "gate"), (mlp, "up")), down=mlp.down))
    groups.append(_Group(f"blocks/{i}/mlp/down", (mlp.down,), ("dense", mlp.up),
                         ((mlp, "down"),)))
  if isinstance(model.head, Dense):
    groups.append(_Group("head", (model.head,), ("norm", model.final_norm), ((model, "head"),)))
  for g in groups:
    for layer in g.layers:
      if not isinstance(layer, Dense) or layer.quantization != "none":
        raise ValueError(f"{g.name}: expected float models.layers.Dense layers")
  return groups


class _Tap(nnx.Module):
  """Calls `sink(x)` with the layer's input, then the layer (eager calibration runs only)."""

  def __init__(self, inner: Any, sink: Callable[[jax.Array], None]):
    self.inner = inner
    self.sink = sink

  def __call__(self, x: jax.Array) -> jax.Array:
    self.sink(x)
    return self.inner(x)


def collect_inputs(model: Any, tokens: np.ndarray, max_rows: int) -> dict[str, np.ndarray]:
  """Group name -> the first layer's inputs [rows, in] (float32) over the calibration tokens."""
  probe = nnx.clone(model)
  found: dict[str, list[jax.Array]] = {}
  for g in _groups(probe):
    parent, attr = g.sets[0]
    setattr(parent, attr, _Tap(getattr(parent, attr), found.setdefault(g.name, []).append))
  probe(jnp.asarray(tokens))  # eager: the taps see concrete arrays
  out = {}
  for name, xs in found.items():
    x = np.concatenate([np.asarray(a, np.float32).reshape(-1, a.shape[-1]) for a in xs])
    out[name] = x[np.linspace(0, len(x) - 1, min(max_rows, len(x))).astype(np.int64)]
  return out


@functools.partial(jax.jit, static_argnames=("group_size",))
def _scaled_error(x: jax.Array, w: jax.Array, s: jax.Array, group_size: int) -> jax.Array:
  """Mean squared error of x @ W against (x / s) @ Q(diag(s) W), Q = int4 round trip."""
  hi = jax.lax.Precision.HIGHEST
  ref = jnp.dot(x, w, precision=hi)
  wq = fake_quantize_int4(w * s[:, None], group_size)
  return jnp.mean((jnp.dot(x / s[None, :], wq, precision=hi) - ref) ** 2)


@functools.partial(jax.jit, static_argnames=("group_size",))
def _mlp_error(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, s: jax.Array,
               group_size: int) -> jax.Array:
  """Mean squared error of the gated MLP's output with gate and up through int4 (down float):
  llm-awq's `module2inspect=mlp`, so the search weighs errors as the MLP passes them on."""
  hi = jax.lax.Precision.HIGHEST

  def mlp(xx, wg, wu):
    h = jax.nn.silu(jnp.dot(xx, wg, precision=hi)) * jnp.dot(xx, wu, precision=hi)
    return jnp.dot(h, w_down, precision=hi)

  q = lambda w: fake_quantize_int4(w * s[:, None], group_size)  # noqa: E731
  return jnp.mean((mlp(x / s[None, :], q(w_gate), q(w_up)) - mlp(x, w_gate, w_up)) ** 2)


def search_scales(x: np.ndarray, error: Callable[[jax.Array], jax.Array], config: AwqConfig
                  ) -> tuple[np.ndarray, float, float, float]:
  """Grid search over alpha for inputs x [rows, K] -> (s, alpha, error, error at s = 1 (RTN)).

  `error(s)` is the output error of the group with int4 weights and input scales s [K].
  """
  x_mean = np.maximum(np.abs(x).mean(axis=0), 1e-4)  # [K]
  best = None
  rtn = float(error(jnp.ones(x.shape[1], jnp.float32)))
  alphas = [i / config.grid for i in range(config.grid)] if config.search else [0.0]
  for alpha in alphas:
    s = np.maximum(x_mean ** alpha, 1e-4)
    s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
    err = rtn if alpha == 0 else float(error(jnp.asarray(s)))
    if best is None or err < best[2]:
      best = (s, alpha, err)
  return best[0], best[1], best[2], rtn


def _fold(group: _Group, s: jax.Array) -> None:
  """Divides the input of `group` by s in the op before it, multiplies its weight rows by s."""
  kind, prev = group.fold
  if kind == "norm":
    prev.scale[...] = prev.scale[...] / s
  else:
    prev.kernel[...] = prev.kernel[...] / s[None, :]
  for layer in group.layers:
    layer.kernel[...] = layer.kernel[...] * s[:, None]


def quantize_decoder(model: Any, tokens: np.ndarray, config: AwqConfig = AwqConfig()
                     ) -> tuple[Any, list[LayerReport]]:
  """An int4 copy of decoder `model` (AWQ scales folded in, or RTN) and the per-group report.

  `tokens` [n, T] is the calibration set (`calibration_tokens`); the input model is unchanged.
  """
  out = nnx.clone(model)
  inputs = collect_inputs(out, tokens, config.max_rows)
  groups = _groups(out)
  reports = []
  for g in groups:  # activations come from the float model: every fold is exact in float
    x, gs = jnp.asarray(inputs[g.name]), config.group_size
    ws = [layer.kernel[...] for layer in g.layers]
    if g.down is not None:  # the MLP output (down float, not yet folded: this group goes first)
      error = functools.partial(_mlp_error, x, *ws, g.down.kernel[...], group_size=gs)
    else:  # per-column quantization: the layers' outputs side by side
      error = functools.partial(_scaled_error, x, jnp.concatenate(ws, axis=1), group_size=gs)
    s, alpha, err, rtn = search_scales(inputs[g.name], error, config)
    if alpha != 0:
      _fold(g, jnp.asarray(s))
    reports.append(LayerReport(g.name, alpha, err, rtn))
    logger.info("awq %s: alpha %.2f, error %.3g (rtn %.3g)", g.name, alpha, err, rtn)
  for g in groups:
    for parent, attr in g.sets:
      setattr(parent, attr, Int4Dense.from_dense(getattr(parent, attr),
                                                 group_size=config.group_size))
  return out, reports


INT4_WEIGHTS: tuple[str, ...] = ("awq", "int4")  # AWQ-scaled int4; plain round-to-nearest int4


def quantize_generate_weights(model: Any, weights: str, *, group_size: int = 128,
                              seed: int = 1) -> tuple[Any, dict[str, Any]]:
  """The decoder with its dense weights as `weights` says, and what to record in the manifest.

  "awq" / "int4": int4 here, calibrated on `seed`'s ad corpus; any other name goes through
  `export.quantize.quantize_model` (int8, fp8: the CTR models' path).
  """
  if weights not in INT4_WEIGHTS:
    from export.quantize import DENSE_MODES, quantize_model  # pylint: disable=g-import-not-at-top
    if weights not in DENSE_MODES:
      raise ValueError(f"weights={weights!r} must be one of {(*DENSE_MODES, *INT4_WEIGHTS)}")
    return quantize_model(model, weights), {}
  from export.generative import ad_corpus  # pylint: disable=g-import-not-at-top

  config = AwqConfig(group_size=group_size, seed=seed, search=weights == "awq")
  tokens = calibration_tokens(ad_corpus(config.calibration_lines, seed=config.seed),
                              config.seq_len)
  out, reports = quantize_decoder(model, tokens, config)
  return out, {"int4": {"method": weights, "group_size": group_size, "zero_point": True,
                        "calibration": {"lines": config.calibration_lines, "seed": config.seed,
                                        "windows": int(tokens.shape[0]),
                                        "seq_len": config.seq_len},
                        "layers": [dataclasses.asdict(r) for r in reports]}}
