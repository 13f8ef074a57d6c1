"""The demo LM's trained weights, shipped in the repository so that a first start need not train.

`tools/make_demo_weights.py` runs the demo's training once (export/generative.py `train`, the
run a first start would otherwise do) and writes `demo/weights/lm.npz`: every matrix as int8
with one float32 scale per row of its last axis (3 MB instead of 12 MB of float32; greedy
generations are unchanged), vectors as float32, the recipe the weights were trained with, and
reference outputs (next-token logits and greedy continuations of fixed prompts) that the tests
recompute. The demo uses the file when its recipe matches and trains (with progress lines)
when it is missing or stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import zipfile
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # imported lazily: `xlaserve serve` on a warm cache never needs them
  from export.generative import GenerativeExportConfig
  from models.decoder import Decoder, DecoderConfig

logger = logging.getLogger(__name__)

LM_WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights" / "lm.npz"
FORMAT = 1
QUANTIZATION = "int8, symmetric, one float32 scale per row of the last axis; vectors float32"
REFERENCE_PROMPTS: tuple[str, ...] = ("Acme", "Lumen desk lamps:")
REFERENCE_TOKENS = 32  # greedy continuation length recorded per prompt


class WeightsUnavailable(ValueError):
  """The shipped weights are missing, unreadable, or for another recipe (the reason says which)."""


def lm_recipe(model_config: DecoderConfig, config: GenerativeExportConfig) -> dict[str, Any]:
  """Everything the trained weights are a function of: model shape, training run, corpus (hashed
  text, so a template edit counts) and tokenizer. `attention_impl` changes kernels, not weights."""
  from export.generative import ad_corpus
  from models.tokenizer import ByteTokenizer

  model = {k: v for k, v in model_config.to_json().items() if k != "attention_impl"}
  corpus = "\n".join(ad_corpus(seed=config.seed)).encode()
  return {"model": model,
          "train": {f: getattr(config, f) for f in ("train_steps", "train_batch", "train_seq_len",
                                                    "learning_rate", "seed")},
          "corpus_sha256": hashlib.sha256(corpus).hexdigest(),
          "tokenizer": ByteTokenizer().spec()}


def recipe_key(recipe: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# -- int8 rows ------------------------------------------------------------------------------

def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """w [..., N] float -> (q [..., N] int8, scale [...] float32) with w ~= q * scale[..., None]
  and |w - q * scale| <= scale / 2."""
  w = np.asarray(w, np.float32)
  amax = np.abs(w).max(axis=-1)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int8)
  return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
  return q.astype(np.float32) * scale[..., None]


# -- model <-> arrays ------------------------------------------------------------------------

def _param_leaves(model: Decoder) -> tuple[list[tuple[str, Any]], Any, Any]:
  """([(name like "blocks.0.attn.wq", array)], treedef, state) of the model's nnx.Params."""
  import jax
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  named = []
  for path, leaf in leaves:
    parts = [str(next(getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)))
             for k in path]
    named.append((".".join(p for p in parts if p != "value"), leaf))
  return named, treedef, state


def pack(model: Decoder) -> dict[str, np.ndarray]:
  """The model's params as npz arrays: `<name>.q` int8 and `<name>.scale` for matrices,
  `<name>` float32 for vectors."""
  arrays = {}
  for name, leaf in _param_leaves(model)[0]:
    w = np.asarray(leaf, np.float32)
    if w.ndim >= 2:
      arrays[f"{name}.q"], arrays[f"{name}.scale"] = quantize_rows(w)
    else:
      arrays[name] = w
  return arrays


def unpack_into(model: Decoder, arrays: dict[str, np.ndarray]) -> None:
  """Sets the model's params from `pack`ed arrays; WeightsUnavailable if any is missing or has
  another shape."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  named, treedef, _ = _param_leaves(model)
  new = []
  for name, leaf in named:
    if f"{name}.q" in arrays:
      w = dequantize_rows(arrays[f"{name}.q"], arrays[f"{name}.scale"])
    elif name in arrays:
      w = np.asarray(arrays[name], np.float32)
    else:
      raise WeightsUnavailable(f"the weights file has no {name!r}")
    if w.shape != leaf.shape:
      raise WeightsUnavailable(f"{name}: shape {w.shape} in the file, {leaf.shape} in the model")
    new.append(jnp.asarray(w, leaf.dtype))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))


# -- reference outputs -------------------------------------------------------------------------

def reference_outputs(model: Decoder, prompts: tuple[str, ...] = REFERENCE_PROMPTS,
                      max_new_tokens: int = REFERENCE_TOKENS) -> dict[str, np.ndarray]:
  """`logits` [P, V]: next-token logits after each prompt (BOS + bytes); `tokens.<i>`: its greedy
  continuation (the full-forward reference, models/decoder.py `greedy_reference`)."""
  import jax.numpy as jnp

  from models.decoder import greedy_reference
  from models.tokenizer import ByteTokenizer

  tok = ByteTokenizer()
  ids = [tok.encode(p) for p in prompts]
  logits = [np.asarray(model(jnp.asarray([seq], jnp.int32))[0, -1], np.float32) for seq in ids]
  gen = greedy_reference(model, ids, max_new_tokens=max_new_tokens, eos_id=tok.eos_id)
  return {"logits": np.stack(logits),
          **{f"tokens.{i}": np.asarray(g, np.int32) for i, g in enumerate(gen)}}


# -- files -----------------------------------------------------------------------------------

def save_lm(path: pathlib.Path, model: Decoder, config: GenerativeExportConfig,
            training: dict[str, Any], *,
            quality: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the packed weights of `model` (trained with `config`), the recipe and reference
  outputs computed with the packed (int8) weights themselves; returns the metadata."""
  import jax
  from flax import nnx

  from models.decoder import Decoder

  arrays = pack(model)
  shipped = Decoder(model.config, rngs=nnx.Rngs(0))
  unpack_into(shipped, arrays)
  recipe = lm_recipe(model.config, config)
  meta = {"format": FORMAT, "recipe": recipe, "recipe_key": recipe_key(recipe),
          "quantization": QUANTIZATION, "training": training, "quality": quality or {},
          "jax_version": jax.__version__, "reference_prompts": list(REFERENCE_PROMPTS),
          "made_by": "tools/make_demo_weights.py"}
  refs = {f"reference.{k}": v for k, v in reference_outputs(shipped).items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez_compressed(tmp, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays, **refs)
  tmp.replace(path)
  return meta


def read_lm(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(metadata, arrays) of a weights file; WeightsUnavailable if it is missing or unreadable."""
  if not path.is_file():
    raise WeightsUnavailable(f"no shipped LM weights at {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays.pop("meta")))
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise WeightsUnavailable(f"cannot read {path}: {e}") from e
  if meta.get("format") != FORMAT:
    raise WeightsUnavailable(f"{path} has format {meta.get('format')}, this code reads {FORMAT}")
  return meta, arrays


def load_lm(path: pathlib.Path, model_config: DecoderConfig,
            config: GenerativeExportConfig) -> tuple[Decoder, dict[str, Any]]:
  """(Decoder with the shipped weights, metadata); WeightsUnavailable when the file is missing,
  unreadable, or trained for another recipe than (`model_config`, `config`)."""
  from flax import nnx

  from models.decoder import Decoder

  meta, arrays = read_lm(path)
  want = recipe_key(lm_recipe(model_config, config))
  if meta.get("recipe_key") != want:
    raise WeightsUnavailable(f"{path} holds weights for recipe {meta.get('recipe_key')}, the demo"
                             f" LM's is {want} (regenerate: python tools/make_demo_weights.py)")
  model = Decoder(model_config, rngs=nnx.Rngs(config.seed))
  unpack_into(model, arrays)
  return model, meta


def train_lm(model_config: DecoderConfig, config: GenerativeExportConfig,
             progress: Callable[[str], None]) -> tuple[Decoder, dict[str, Any]]:
  """The demo LM trained now, as a first start without shipped weights does: (model, report)."""
  from flax import nnx

  from export.generative import ad_corpus, train
  from models.decoder import Decoder
  from models.tokenizer import ByteTokenizer

  model = Decoder(model_config, rngs=nnx.Rngs(config.seed))
  if not config.train_steps:
    return model, {}
  return model, train(model, ad_corpus(seed=config.seed), config, ByteTokenizer(),
                      progress=progress)


def trained_lm(model_config: DecoderConfig, config: GenerativeExportConfig,
               progress: Callable[[str], None], *,
               weights: pathlib.Path | None = LM_WEIGHTS) -> tuple[Decoder, dict[str, Any]]:
  """(model, {"training": report, "weights": where they came from}): the shipped weights when
  `weights` holds this recipe's, else trained now (None: always train)."""
  if weights is not None:
    try:
      model, meta = load_lm(weights, model_config, config)
      progress(f"lm: using the shipped trained weights {weights.name} (recipe"
               f" {meta['recipe_key']}; {meta['quantization'].split(',')[0]})")
      return model, {"training": meta["training"], "weights": f"shipped {weights.name}"}
    except WeightsUnavailable as e:
      progress(f"lm: {e}; training it now instead ({config.train_steps} steps, about 2 minutes"
               " on 2 cores)")
  model, report = train_lm(model_config, config, lambda msg: progress(f"lm: {msg}"))
  return model, {"training": report, "weights": "trained at build time"}
