"""Flax model (NNX module, Linen module + variables, or apply function) -> serving bundle.

The bundle is self-contained: serving it needs neither the model's code nor its
Python environment, only the StableHLO, the params and the manifest.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import bundle as bundle_lib
from bundle import Manifest, ParamSpec, Signature, TableLookup, TensorSpec
from export.config import DEFAULT_BATCH_BUCKETS, ExportConfig, Input
from export.invariant import run_rows
from export.lookup import export_from_embeddings, table_split
from export.tracing import (
    TRITON_CUSTOM_CALL, as_output_dict, disabled_checks, is_nnx_module, nnx_parts, output_specs,
    tree_parts,
)

__all__ = ["DEFAULT_BATCH_BUCKETS", "TRITON_CUSTOM_CALL", "ExportConfig", "Input", "export_model"]

logger = logging.getLogger(__name__)

Rebuild = Callable[[list[Any]], Any]


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
  model_dir, version = _model_dir(repository, name, version)
  model, is_nnx, leaves, specs, rebuild = _flatten(model, params, logical_axes, config)
  # Models with categorical tables (models.embedding.CategoricalEmbeddings) also export their
  # default signature from looked-up embeddings: what table-wise serving runs after its lookup.
  split = table_split(model, specs) if is_nnx and signatures is None else None
  if signatures is None:
    signatures = _default_signatures(model, is_nnx)
  sig_inputs = _signature_inputs(inputs, signatures, config)
  artifacts: dict[str, bytes] = {}
  sig_manifest = {
      sig_name: _export_signature(sig_name, sig_fn, sig_inputs[sig_name], leaves, rebuild,
                                  output_names, config, split, artifacts)
      for sig_name, sig_fn in signatures.items()}
  manifest = _manifest(name, version, sig_manifest, specs, config, artifacts, extra)
  return bundle_lib.write_bundle(model_dir / str(version), manifest, leaves, artifacts)


def _model_dir(repository: str | os.PathLike[str], name: str,
               version: int | None) -> tuple[pathlib.Path, int]:
  """`<repository>/<name>` and the version to write (default: one past the newest there)."""
  if not bundle_lib.MODEL_NAME_RE.fullmatch(name):
    raise ValueError(f"model name {name!r} must match {bundle_lib.MODEL_NAME_RE.pattern}")
  model_dir = pathlib.Path(repository) / name
  if version is None:
    version = (bundle_lib.list_versions(model_dir) or [0])[-1] + 1
  if version < 1:
    raise ValueError(f"version must be >= 1, got {version}")
  return model_dir, version


def _flatten(model: Any, params: Any, logical_axes: Any, config: ExportConfig
             ) -> tuple[Any, bool, list[Any], list[ParamSpec], Rebuild]:
  """(model, is_nnx, leaves, specs, rebuild); an NNX model comes back quantized as configured."""
  from export.quantize import quantize_for_export

  is_nnx = is_nnx_module(model)
  if is_nnx:
    model = quantize_for_export(model, config.quantization)
    leaves, specs, rebuild = nnx_parts(model)
  elif (hasattr(model, "apply") or callable(model)) and params is not None:  # Linen or function
    leaves, specs, rebuild = tree_parts(params, logical_axes)
  else:
    raise TypeError("model must be an NNX module, or a Linen module / apply function with params=")
  if not is_nnx and config.quantization != "none":
    raise ValueError("quantization at export is supported for NNX modules built from models.layers")
  return model, is_nnx, leaves, specs, rebuild


def _default_signatures(model: Any, is_nnx: bool) -> dict[str, Callable[..., Any]]:
  """The one signature "serve": the model called on its inputs."""
  if is_nnx:
    return {"serve": lambda m, **kw: m(**kw)}
  if hasattr(model, "apply"):
    return {"serve": lambda p, **kw: model.apply(p, **kw)}
  return {"serve": lambda p, **kw: model(p, kw)}


def _signature_inputs(
    inputs: Sequence[Input] | Mapping[str, Sequence[Input]],
    signatures: Mapping[str, Callable[..., Any]], config: ExportConfig,
) -> Mapping[str, Sequence[Input]]:
  """Signature -> its inputs; checks that inputs and config name exactly these signatures."""
  sig_inputs = inputs if isinstance(inputs, Mapping) else {k: inputs for k in signatures}
  if set(sig_inputs) != set(signatures):
    raise ValueError(f"inputs name signatures {sorted(sig_inputs)}, expected {sorted(signatures)}")
  for field in ("signature_seq_buckets", "signature_suffixes"):
    unknown = sorted(set(getattr(config, field)) - set(signatures))
    if unknown:
      raise ValueError(f"ExportConfig.{field} names {unknown}, not signatures of this export"
                       f" ({sorted(signatures)})")
  return sig_inputs


def _input_structs(in_specs: Sequence[TensorSpec], batch: Any,
                   seq: int | None) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract inputs with "batch" and "seq" dimensions set to `batch` and `seq`."""
  sym = {"batch": batch, "seq": seq}
  return {
      spec.name: jax.ShapeDtypeStruct(
          tuple(sym[d] if d else n for d, n in zip(spec.dims, spec.shape)),
          jnp.bfloat16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype))
      for spec in in_specs
  }


def _export_signature(
    sig_name: str, sig_fn: Callable[..., Any], inputs: Sequence[Input], leaves: Sequence[Any],
    rebuild: Rebuild, output_names: Sequence[str] | None, config: ExportConfig,
    split: TableLookup | None, artifacts: dict[str, bytes],
) -> Signature:
  """Exports signature `sig_name` into `artifacts` and returns its manifest entry."""
  in_specs = [i.to_spec() for i in inputs]
  has_seq = any("seq" in s.dims for s in in_specs)
  seq_buckets = config.seq_buckets_for(sig_name) if has_seq else ()
  if has_seq and not seq_buckets:
    raise ValueError(f"signature {sig_name!r} has a 'seq' dimension: give"
                     " ExportConfig.seq_buckets")
  # Batch stays symbolic; the sequence is concrete, one artifact per sequence bucket
  # (Pallas kernels such as flash_attention need static sequence lengths).
  (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))

  def in_structs(seq: int | None, batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    return _input_structs(in_specs, b if batch is None else batch, seq)

  def serve_fn(param_leaves, ins):
    target = rebuild(list(param_leaves))
    run = lambda rows: as_output_dict(sig_fn(target, **rows), output_names)
    return run_rows(run, ins, deterministic=config.deterministic, tile=config.invariant_tile)

  param_structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  out_specs = output_specs(serve_fn, param_structs, in_structs, b, seq_buckets)
  files = _export_artifacts(sig_name, serve_fn, param_structs, in_structs, seq_buckets, config,
                            artifacts)
  lookup = None
  if split is not None and not has_seq:
    lookup = export_from_embeddings(split, sig_name, in_specs, leaves, rebuild, output_names,
                                    config, artifacts)
  signature = Signature(
      sig_name, tuple(in_specs), out_specs, files,
      seq_buckets if seq_buckets != tuple(config.seq_buckets) else (), lookup)
  logger.info("exported signature %s for %s", sig_name, config.platforms)
  return signature


def _export_artifacts(
    sig_name: str, serve_fn: Callable[..., Any], param_structs: list[jax.ShapeDtypeStruct],
    in_structs: Callable[..., dict[str, jax.ShapeDtypeStruct]], seq_buckets: Sequence[int],
    config: ExportConfig, artifacts: dict[str, bytes],
) -> dict[str, str]:
  """One serialized artifact per platform and sequence bucket into `artifacts`; key -> file name."""
  files = {}
  for platform in config.platforms:
    checks = disabled_checks(platform)
    # GPU kernels (Pallas/Triton) need static grids: one artifact per batch bucket there.
    batches = ((*config.batch_buckets, *config.reserve_batch_buckets)
               if platform in ("cuda", "rocm") else (None,))
    for seq in seq_buckets or (None,):
      for batch in batches:
        exp = jax.export.export(jax.jit(serve_fn), platforms=(platform,),
                                disabled_checks=checks)(param_structs, in_structs(seq, batch=batch))
        key = bundle_lib.artifact_key(platform, seq, batch)
        fname = f"{sig_name}.{key.replace('@', '.')}.jaxexport"
        artifacts[fname] = bytes(exp.serialize())
        files[key] = fname
  return files


def _manifest(name: str, version: int, signatures: dict[str, Signature],
              specs: Sequence[ParamSpec], config: ExportConfig, artifacts: Mapping[str, bytes],
              extra: Mapping[str, Any] | None) -> Manifest:
  """The `kind="predict"` manifest of the exported signatures and params."""
  return Manifest(
      name=name, version=version, kind="predict", jax_version=jax.__version__,
      signatures=signatures, params=tuple(specs), batch_buckets=config.batch_buckets,
      seq_buckets=config.seq_buckets, quantization=config.quantization,
      code_hash=bundle_lib.compute_code_hash(artifacts, specs, config.batch_buckets,
                                             config.seq_buckets),
      serving={"max_queue_delay_us": config.max_queue_delay_us,
               **({"deterministic": True, "invariant_tile": config.invariant_tile}
                  if config.deterministic else {}),
               **({"signature_suffixes": dict(config.signature_suffixes)}
                  if config.signature_suffixes else {})},
      extra=dict(extra or {}))
