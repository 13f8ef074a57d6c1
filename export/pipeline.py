"""Writes a pipeline into a model repository: a manifest of kind "pipeline" (no params, no
StableHLO) whose steps call served models and built-in ops (bundle/pipeline.py).

The config is plain data, as a user would write it by hand:

  {"inputs":  [{"name": "query", "datatype": "BYTES", "shape": [1]}, ...],
   "outputs": [{"name": "ad_ids", "datatype": "INT32", "shape": [1, 10],
                "from": "select.ad_ids"}, ...],
   "handoff": "auto",   # model step to model step: "device", "host", or "auto" (device on GPU/TPU)
   "steps":   [{"name": "embed", "model": "two_tower_query",
                "inputs": {"token_ids": "tokenize.token_ids", ...}}, ...]}

Every pipeline tensor has one row per request (a leading 1), fixed shapes.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import jax

from bundle import BY_TRITON, Manifest, PipelineSpec, Signature, Source, TensorSpec, write_bundle
from export.exporter import _model_dir


def _tensor(d: Mapping[str, Any], where: str) -> TensorSpec:
  known = BY_TRITON.get(d.get("datatype", ""))
  if known is None:
    raise ValueError(f"{where} {d.get('name')!r}: datatype {d.get('datatype')!r} is not one of"
                     f" {sorted(BY_TRITON)}")
  shape = tuple(int(n) for n in d["shape"])
  if not shape or shape[0] != 1 or min(shape) < 1:
    raise ValueError(f"{where} {d['name']!r}: shape {list(shape)} must be fixed with a leading"
                     " 1 (one row per request)")
  return TensorSpec(d["name"], known.numpy, shape, (None,) * len(shape))


def export_pipeline(config: Mapping[str, Any], *, repository: str | os.PathLike[str], name: str,
                    version: int | None = None, description: str = "") -> pathlib.Path:
  """Writes `<repository>/<name>/<version>/manifest.json` for `config`; raises ValueError for a
  source naming nothing defined before it, an unknown op, or malformed tensors."""
  model_dir, version = _model_dir(repository, name, version)
  inputs = tuple(_tensor(d, "input") for d in config["inputs"])
  outputs = tuple(_tensor(d, "output") for d in config["outputs"])
  spec = PipelineSpec.from_json({"steps": config["steps"], "handoff": config.get("handoff", "auto"),
                                 "outputs": {d["name"]: d["from"] for d in config["outputs"]}})
  manifest = Manifest(
      name=name, version=version, kind="pipeline", jax_version=jax.__version__,
      signatures={"serve": Signature("serve", inputs, outputs, {})}, params=(),
      batch_buckets=(1,), pipeline=spec, extra={"description": description} if description
      else {})
  return write_bundle(model_dir / str(version), manifest, [], {})


__all__ = ["Source", "export_pipeline"]
