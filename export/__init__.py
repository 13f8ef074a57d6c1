"""Flax model + params -> self-contained serving bundle (orbax params, StableHLO, manifest)."""

from bundle import (BundleError, Manifest, ParamSpec, Signature, TensorSpec, read_manifest,
                           served_models)
from export.exporter import DEFAULT_BATCH_BUCKETS, ExportConfig, Input, export_model
from export.context import export_context_model
from export.pipeline import export_pipeline
from export.torch import export_torch  # PyTorch models (needs torch at export time only)
from export.onnx_export import export_onnx  # ONNX files (needs onnx and jaxonnxruntime)
