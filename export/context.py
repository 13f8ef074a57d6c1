"""Context models: a signature exported in two parts, so the server computes the per-request side
(a user, a query) once per request instead of once per candidate ad.

The context part maps the context inputs (one row per request) to named features; the scoring
part maps each candidate's inputs plus its request's feature row to the outputs. Served, a
request sends its context inputs with one row and its candidate inputs with N rows; the outputs
have N rows and equal the flat model fed the context rows repeated N times.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax

from bundle import ContextSplit, Signature, TensorSpec
from bundle import write_bundle
from export.config import ExportConfig, Input
from export.exporter import _export_artifacts, _flatten, _input_structs, _manifest, _model_dir
from export.invariant import run_rows
from export.tracing import as_output_dict, output_specs

SINGLE_FEATURE = "context"  # the feature's name when the context part returns one array

ContextFn = Callable[..., Any]
ScoreFn = Callable[..., Any]


def export_context_model(
    model: Any, *, repository: str | os.PathLike[str], name: str,
    context_inputs: Sequence[Input],
    candidate_inputs: Sequence[Input],
    context_fn: ContextFn,
    score_fn: ScoreFn,
    version: int | None = None,
    params: Any = None,
    logical_axes: Any = None,
    output_names: Sequence[str] | None = None,
    config: ExportConfig = ExportConfig(),
    extra: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes `<repository>/<name>/<version>/` with one signature "serve" in two parts.

  context_fn: `context_fn(model, **context_inputs)` for NNX (`(params, **inputs)` for Linen
    modules and functions) -> a dict name -> [R, ...] array, or one array (named "context").
  score_fn: `score_fn(model, context, **candidate_inputs)`, where `context` is what
    `context_fn` returned with each candidate's request row ([C, ...]) -> outputs [C, ...].
  Every input's first dimension is "batch": requests for context inputs, candidates for the
  others. The context part is compiled at `config.request_buckets`, scoring at
  `config.batch_buckets`.
  """
  _check_names(context_inputs, candidate_inputs)
  model_dir, version = _model_dir(repository, name, version)
  model, _, leaves, specs, rebuild = _flatten(model, params, logical_axes, config)
  param_structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  (b,) = jax.export.symbolic_shape("b", constraints=("b >= 1",))
  artifacts: dict[str, bytes] = {}

  ctx_specs = [i.to_spec() for i in context_inputs]
  single: list[bool] = []

  def context_part(param_leaves, ins):
    target = rebuild(list(param_leaves))

    def run(rows):
      out = context_fn(target, **rows)
      single[:] = [not isinstance(out, Mapping)]
      return {SINGLE_FEATURE: out} if single[0] else dict(out)
    return run_rows(run, ins, deterministic=config.deterministic, tile=config.invariant_tile)

  def ctx_structs(seq=None, batch=None):
    return _input_structs(ctx_specs, b if batch is None else batch, None)

  features = output_specs(context_part, param_structs, ctx_structs, b, ())
  feature_names = {t.name for t in features}
  clash = sorted(feature_names & {i.name for i in candidate_inputs})
  if clash:
    raise ValueError(f"context features {clash} share a name with candidate inputs; rename one")
  ctx_config = dataclasses.replace(config, batch_buckets=config.request_buckets)
  ctx_files = _export_artifacts("serve.context", context_part, param_structs, ctx_structs, (),
                                ctx_config, artifacts)

  score_specs = [*features, *(i.to_spec() for i in candidate_inputs)]

  def score_part(param_leaves, ins):
    target = rebuild(list(param_leaves))

    def run(rows):
      feats = {k: rows[k] for k in feature_names}
      ctx = feats[SINGLE_FEATURE] if single[0] else feats
      cand = {k: v for k, v in rows.items() if k not in feature_names}
      return as_output_dict(score_fn(target, ctx, **cand), output_names)
    return run_rows(run, ins, deterministic=config.deterministic, tile=config.invariant_tile)

  def score_structs(seq=None, batch=None):
    return _input_structs(score_specs, b if batch is None else batch, None)

  outputs = output_specs(score_part, param_structs, score_structs, b, ())
  files = _export_artifacts("serve", score_part, param_structs, score_structs, (), config,
                            artifacts)
  served_inputs = (*(_per_request(s) for s in ctx_specs), *score_specs[len(features):])
  signature = Signature("serve", served_inputs, outputs, files,
                        context=ContextSplit(tuple(s.name for s in ctx_specs), features,
                                             ctx_files, tuple(config.request_buckets)))
  manifest = _manifest(name, version, {"serve": signature}, specs, config, artifacts, extra)
  return write_bundle(model_dir / str(version), manifest, leaves, artifacts)


def _check_names(context_inputs: Sequence[Input], candidate_inputs: Sequence[Input]) -> None:
  """At least one of each, no name twice, no sequence dimension."""
  if not context_inputs or not candidate_inputs:
    raise ValueError("a context model needs context_inputs and candidate_inputs (a model"
                     " without a per-request side is exported with export_model)")
  names = [i.name for i in (*context_inputs, *candidate_inputs)]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f"inputs {twice} are named more than once")
  for i in (*context_inputs, *candidate_inputs):
    if "seq" in i.shape:
      raise ValueError(f"input {i.name!r}: context models take fixed-length inputs; pad"
                       " sequences to a fixed length (with a lengths input) at export")


def _per_request(spec: TensorSpec) -> TensorSpec:
  """A context input as served: exactly one row per request ([1, ...])."""
  return TensorSpec(spec.name, spec.dtype, (1, *spec.shape[1:]), (None, *spec.dims[1:]))
