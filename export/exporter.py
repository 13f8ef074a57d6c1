"""Flax model (NNX module, Linen module + variables, or apply function) -> serving bundle.

The bundle is self-contained: serving it needs neither the model's code nor its
Python environment, only the StableHLO, the params and the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bundle as bundle_lib
from bundle import Manifest, ParamSpec, Signature, TableLookup, TensorSpec

logger = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True, slots=True)
class Input:
  """An input of a signature. `shape` holds ints, "batch" or "seq" (bucketed dimensions)."""

  name: str
  dtype: str
  shape: tuple[int | str, ...]

  def __post_init__(self):
    for d in self.shape:
      if isinstance(d, str) and d not in ("batch", "seq"):
        raise ValueError(f"input {self.name!r}: dimension {d!r} must be an int, 'batch' or 'seq'")
    if not self.shape or self.shape[0] != "batch":
      raise ValueError(f"input {self.name!r}: the first dimension must be 'batch', got {self.shape}")

  def to_spec(self) -> TensorSpec:
    return TensorSpec(
        self.name, str(np.dtype(jnp.dtype(self.dtype))) if self.dtype != "bfloat16" else "bfloat16",
        tuple(-1 if isinstance(d, str) else int(d) for d in self.shape),
        tuple(d if isinstance(d, str) else None for d in self.shape))


@dataclasses.dataclass(frozen=True, slots=True)
class ExportConfig:
  """What the export writes beside the computation: buckets, platforms, serving defaults.

  `seq_buckets` applies to every signature with a "seq" dimension unless
  `signature_seq_buckets` gives that signature its own. `signature_suffixes` names the
  served models of a multi-signature bundle (`<model>_<suffix>`, default the signature name).
  """

  batch_buckets: tuple[int, ...] = DEFAULT_BATCH_BUCKETS
  seq_buckets: tuple[int, ...] = ()
  platforms: tuple[str, ...] = ("cpu",)
  quantization: str = "none"
  max_queue_delay_us: int = 2000
  signature_seq_buckets: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  signature_suffixes: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.batch_buckets or list(self.batch_buckets) != sorted(set(self.batch_buckets)):
      raise ValueError(f"batch_buckets must be strictly increasing, got {self.batch_buckets}")
    if self.batch_buckets[0] < 1:
      raise ValueError(f"batch_buckets must be positive, got {self.batch_buckets}")
    per_sig = {k: tuple(v) for k, v in self.signature_seq_buckets.items()}
    for label, buckets in [("seq_buckets", tuple(self.seq_buckets))] + [
        (f"signature_seq_buckets[{k!r}]", v) for k, v in per_sig.items()]:
      if list(buckets) != sorted(set(buckets)) or (buckets and buckets[0] < 1):
        raise ValueError(f"{label} must be positive and strictly increasing, got {buckets}")
    for sig, suffix in self.signature_suffixes.items():
      if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", suffix):
        raise ValueError(f"signature_suffixes[{sig!r}]={suffix!r}: use letters, digits, '_',"
                         " '-' and '.' only")
    for p in self.platforms:
      if p not in ("cpu", "cuda", "rocm", "tpu"):
        raise ValueError(f"unknown platform {p!r}")
    object.__setattr__(self, "signature_seq_buckets", types.MappingProxyType(per_sig))
    object.__setattr__(self, "signature_suffixes",
                       types.MappingProxyType(dict(self.signature_suffixes)))

  def seq_buckets_for(self, signature: str) -> tuple[int, ...]:
    """The sequence buckets signature `signature` is exported (and served) at."""
    return tuple(self.signature_seq_buckets.get(signature, self.seq_buckets))


def _dtype_name(dtype: Any) -> str:
  return "bfloat16" if jnp.dtype(dtype) == jnp.bfloat16 else str(np.dtype(dtype))


def _nnx_parts(module: Any) -> tuple[list[Any], list[ParamSpec], Callable[[list[Any]], Any]]:
  """Flattens an NNX module to leaves + specs, and returns a rebuild(leaves) -> module.

  The rebuilt module is in eval mode (`nnx.Module.eval()`: dropout off, batch norm on its
  running statistics): serving is deterministic. RNG state (e.g. the `nnx.Rngs` a Dropout
  layer keeps) is not a parameter; it stays a constant of the export.
  """
  from flax import nnx

  graphdef, rng_state, state = nnx.split(module, nnx.RngState, ...)
  variables, treedef = jax.tree.flatten(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
  leaves, specs = [], []
  for path, var in zip(paths, variables):
    value = var[...] if isinstance(var, nnx.Variable) else var
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    leaves.append(value)
    specs.append(ParamSpec(jax.tree_util.keystr(path, simple=True, separator="/"),
                           tuple(value.shape), _dtype_name(value.dtype),
                           None if axes is None else tuple(axes)))

  def rebuild(new_leaves: list[Any]) -> Any:
    new_vars = [v.replace(x) if isinstance(v, nnx.Variable) else x
                for v, x in zip(variables, new_leaves)]
    rebuilt = nnx.merge(graphdef, rng_state, jax.tree.unflatten(treedef, new_vars))
    rebuilt.eval()
    return rebuilt

  return leaves, specs, rebuild


def _tree_parts(params: Any, logical_axes: Any = None
                ) -> tuple[list[Any], list[ParamSpec], Callable[[list[Any]], Any]]:
  """Flattens a params pytree to leaves + specs, with optional matching logical axes tree."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  axes_leaves = ([None] * len(flat) if logical_axes is None else
                 jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple) or x is None))
  if len(axes_leaves) != len(flat):
    raise ValueError(f"logical_axes has {len(axes_leaves)} leaves, params {len(flat)}")
  leaves = [jnp.asarray(x) for _, x in flat]
  specs = [ParamSpec(jax.tree_util.keystr(p, simple=True, separator="/"), tuple(x.shape),
                     _dtype_name(x.dtype), None if a is None else tuple(a))
           for (p, _), x, a in zip(flat, leaves, axes_leaves)]
  return leaves, specs, lambda new: jax.tree.unflatten(treedef, new)


def _as_output_dict(out: Any, output_names: Sequence[str] | None) -> dict[str, jax.Array]:
  if isinstance(out, Mapping):
    return dict(out)
  outs = list(out) if isinstance(out, (tuple, list)) else [out]
  names = list(output_names) if output_names else (
      ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])
  if len(names) != len(outs):
    raise ValueError(f"{len(outs)} outputs but output_names={names}")
  return dict(zip(names, outs))


def export_model(
    model: Any,
    *,
    repository: str | os.PathLike[str],
    name: str,
    inputs: Sequence[Input] | Mapping[str, Sequence[Input]],
    version: int | None = None,
    params: Any = None,
    logical_axes: Any = None,
    signatures: Mapping[str, Callable[..., Any]] | None = None,
    output_names: Sequence[str] | None = None,
    config: ExportConfig = ExportConfig(),
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `<repository>/<name>/<version>/` and returns its path.

  model: an NNX module (called as `model(**inputs)`), a Linen module (pass its
    variables as `params`; called as `model.apply(params, **inputs)`), or a plain
    `apply(params, inputs_dict)` function with `params`.
  inputs: the inputs of the default signature "serve", or a dict signature -> inputs.
  signatures: optional name -> callable; for NNX `fn(module, **inputs)`, for Linen
    and functions `fn(params, **inputs)`. Defaults to one signature "serve".
  Outputs are a dict name -> array, or arrays named by `output_names`.
  """
  from export.quantize import quantize_for_export

  if not _NAME_RE.fullmatch(name):
    raise ValueError(f"model name {name!r} must match {_NAME_RE.pattern}")
  model_dir = pathlib.Path(repository) / name
  if version is None:
    version = (bundle_lib.list_versions(model_dir) or [0])[-1] + 1
  if version < 1:
    raise ValueError(f"version must be >= 1, got {version}")

  is_nnx = _is_nnx_module(model)
  if is_nnx:
    model = quantize_for_export(model, config.quantization)
    leaves, specs, rebuild = _nnx_parts(model)
  elif hasattr(model, "apply") and params is not None:  # Linen
    leaves, specs, rebuild = _tree_parts(params, logical_axes)
    linen = model
  elif callable(model) and params is not None:
    leaves, specs, rebuild = _tree_parts(params, logical_axes)
  else:
    raise TypeError("model must be an NNX module, or a Linen module / apply function with params=")
  if not is_nnx and config.quantization != "none":
    raise ValueError("quantization at export is supported for NNX modules built from models.layers")

  # Models with categorical tables (models.embedding.CategoricalEmbeddings) also export their
  # default signature from looked-up embeddings: what table-wise serving runs after its lookup.
  split = _table_split(model, specs) if is_nnx and signatures is None else None
  if signatures is None:
    if is_nnx:
      signatures = {"serve": lambda m, **kw: m(**kw)}
    elif hasattr(model, "apply"):
      signatures = {"serve": lambda p, **kw: linen.apply(p, **kw)}
    else:
      signatures = {"serve": lambda p, **kw: model(p, kw)}
  sig_inputs = inputs if isinstance(inputs, Mapping) else {k: inputs for k in signatures}
  if set(sig_inputs) != set(signatures):
    raise ValueError(f"inputs name signatures {sorted(sig_inputs)}, expected {sorted(signatures)}")
  for field in ("signature_seq_buckets", "signature_suffixes"):
    unknown = sorted(set(getattr(config, field)) - set(signatures))
    if unknown:
      raise ValueError(f"ExportConfig.{field} names {unknown}, not signatures of this export"
                       f" ({sorted(signatures)})")

  param_structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  artifacts: dict[str, bytes] = {}
  sig_manifest: dict[str, Signature] = {}
  for sig_name, sig_fn in signatures.items():
    in_specs = [i.to_spec() for i in sig_inputs[sig_name]]
    has_seq = any("seq" in s.dims for s in in_specs)
    seq_buckets = config.seq_buckets_for(sig_name) if has_seq else ()
    if has_seq and not seq_buckets:
      raise ValueError(f"signature {sig_name!r} has a 'seq' dimension: give"
                       " ExportConfig.seq_buckets")
    # Batch stays symbolic; the sequence is concrete, one artifact per sequence bucket
    # (Pallas kernels such as flash_attention need static sequence lengths).
    (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))

    def in_structs(seq: int | None, _specs=in_specs,
                   batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
      sym = {"batch": b if batch is None else batch, "seq": seq}
      return {
          spec.name: jax.ShapeDtypeStruct(
              tuple(sym[d] if d else n for d, n in zip(spec.dims, spec.shape)),
              jnp.bfloat16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype))
          for spec in _specs
      }

    def serve_fn(param_leaves, ins, _fn=sig_fn):
      target = rebuild(list(param_leaves))
      return _as_output_dict(_fn(target, **ins), output_names)

    out_specs = _output_specs(serve_fn, param_structs, in_structs, b, seq_buckets)
    files = {}
    for platform in config.platforms:
      checks = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
                if platform in ("cuda", "rocm") else [])
      # GPU kernels (Pallas/Triton) need static grids: one artifact per batch bucket there.
      batches = config.batch_buckets if platform in ("cuda", "rocm") else (None,)
      for seq in seq_buckets or (None,):
        for batch in batches:
          exp = jax.export.export(jax.jit(serve_fn), platforms=(platform,),
                                  disabled_checks=checks)(param_structs, in_structs(seq, batch=batch))
          key = bundle_lib.artifact_key(platform, seq, batch)
          fname = f"{sig_name}.{key.replace('@', '.')}.jaxexport"
          artifacts[fname] = bytes(exp.serialize())
          files[key] = fname
    lookup = None
    if split is not None and not has_seq:
      lookup = _export_from_embeddings(split, sig_name, in_specs, leaves, rebuild, output_names,
                                       config, artifacts)
    sig_manifest[sig_name] = Signature(
        sig_name, tuple(in_specs), out_specs, files,
        seq_buckets if seq_buckets != tuple(config.seq_buckets) else (), lookup)
    logger.info("exported signature %s for %s", sig_name, config.platforms)

  manifest = Manifest(
      name=name, version=version, kind="predict", jax_version=jax.__version__,
      signatures=sig_manifest, params=tuple(specs), batch_buckets=config.batch_buckets,
      seq_buckets=config.seq_buckets, quantization=config.quantization,
      code_hash=bundle_lib.compute_code_hash(artifacts, specs, config.batch_buckets,
                                             config.seq_buckets),
      serving={"max_queue_delay_us": config.max_queue_delay_us,
               **({"signature_suffixes": dict(config.signature_suffixes)}
                  if config.signature_suffixes else {})},
      extra=dict(extra or {}))
  return bundle_lib.write_bundle(model_dir / str(version), manifest, leaves, artifacts)


def _table_split(model: Any, specs: Sequence[ParamSpec]) -> TableLookup | None:
  """The lookup contract of a model with categorical tables (artifacts still empty), else None."""
  if not (hasattr(model, "table_param_paths") and hasattr(model, "from_embeddings")):
    return None
  index = {p.path: i for i, p in enumerate(specs)}
  features = model.table_param_paths()
  missing = sorted({path for f in features for path in f.values()} - set(index))
  if not features or missing:
    logger.warning("%s: table params %s not found; no from-embeddings artifact (table-wise"
                   " serving unavailable)", type(model).__name__, missing)
    return None
  tables = [index[f["table"]] for f in features]
  quantized = all("scale" in f for f in features)
  dims = {specs[i].shape[1] for i in tables}
  dtypes = {specs[i].dtype for i in tables}
  if len(dims) != 1 or len(dtypes) != 1 or (not quantized and any("scale" in f for f in features)):
    logger.warning("%s: tables differ in dim/dtype/quantization (%s, %s); no from-embeddings"
                   " artifact", type(model).__name__, sorted(dims), sorted(dtypes))
    return None
  return TableLookup(
      ids_input=model.ids_input, embeddings_input="embeddings", tables=tuple(tables),
      rows=tuple(specs[i].shape[0] for i in tables), dim=dims.pop(), table_dtype=dtypes.pop(),
      artifacts={},
      scales=tuple(index[f["scale"]] for f in features) if quantized else (),
      offsets=tuple(index[f["offset"]] for f in features) if quantized else ())


def _export_from_embeddings(
    split: TableLookup, sig_name: str, in_specs: Sequence[TensorSpec], leaves: Sequence[Any],
    rebuild: Callable[[list[Any]], Any], output_names: Sequence[str] | None,
    config: ExportConfig, artifacts: dict[str, bytes],
) -> TableLookup:
  """Exports `model.from_embeddings` (params without the tables) beside signature `sig_name`."""
  names = [t.name for t in in_specs]
  if split.ids_input not in names or split.embeddings_input in names:
    raise ValueError(f"signature {sig_name!r} inputs {names} need {split.ids_input!r} and must not"
                     f" already have {split.embeddings_input!r}")
  skip = split.table_leaves
  kept = [i for i in range(len(leaves)) if i not in skip]
  param_structs = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in kept]

  def fn(dense_leaves, ins):
    full: list[Any] = [None] * len(leaves)
    for i, x in zip(kept, dense_leaves):
      full[i] = x
    for i in skip:  # unused by from_embeddings; XLA drops them
      full[i] = jnp.zeros(leaves[i].shape, leaves[i].dtype)
    ins = dict(ins)
    emb = ins.pop(split.embeddings_input)
    return _as_output_dict(rebuild(full).from_embeddings(emb, **ins), output_names)

  (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
  files = {}
  for platform in config.platforms:
    checks = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
              if platform in ("cuda", "rocm") else [])
    for batch in config.batch_buckets if platform in ("cuda", "rocm") else (None,):
      n = b if batch is None else batch
      structs = {t.name: jax.ShapeDtypeStruct(
          (n, *t.shape[1:]), jnp.bfloat16 if t.dtype == "bfloat16" else np.dtype(t.dtype))
                 for t in in_specs if t.name != split.ids_input}
      structs[split.embeddings_input] = jax.ShapeDtypeStruct(
          (n, len(split.tables), split.dim), np.float32)
      exp = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=checks)(
          param_structs, structs)
      key = bundle_lib.artifact_key(platform, None, batch)
      fname = f"{sig_name}.from_embeddings.{key.replace('@', '.')}.jaxexport"
      artifacts[fname] = bytes(exp.serialize())
      files[key] = fname
  return dataclasses.replace(split, artifacts=files)


def _output_specs(serve_fn: Callable[..., Any], param_structs: list[Any],
                  in_structs: Callable[[int | None], dict[str, Any]], b: Any,
                  seq_buckets: Sequence[int]) -> tuple[TensorSpec, ...]:
  """Output specs from abstract evaluation; with sequences, at two lengths to find "seq" dims."""
  if not seq_buckets:
    outs = [jax.eval_shape(serve_fn, param_structs, in_structs(None))]
    seqs: list[int] = []
  else:
    seqs = [seq_buckets[0], seq_buckets[1] if len(seq_buckets) > 1 else
            (seq_buckets[0] - 1 if seq_buckets[0] > 1 else 2)]
    outs = [jax.eval_shape(serve_fn, param_structs, in_structs(s)) for s in seqs]
  specs = []
  for k, v in outs[0].items():
    dims = []
    for i, n in enumerate(v.shape):
      others = [o[k].shape[i] for o in outs]
      if not isinstance(n, int):
        if n != b:
          raise ValueError(f"output {k!r} dimension {i} ({n}) is not the batch dimension")
        dims.append("batch")
      elif seqs and others == seqs:
        dims.append("seq")
      elif len(set(others)) == 1:
        dims.append(None)
      else:
        raise ValueError(f"output {k!r} dimension {i} is {others} at sequence lengths {seqs}:"
                         " an output dimension must be fixed, the batch or the sequence")
    specs.append(TensorSpec(k, _dtype_name(v.dtype),
                            tuple(-1 if d else n for d, n in zip(dims, v.shape)), tuple(dims)))
  return tuple(specs)


def _is_nnx_module(obj: Any) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(obj, nnx.Module)
