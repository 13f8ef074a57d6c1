"""The serving bundle on disk: `<repo>/<model>/<version>/` with manifest, params and StableHLO.

Layout (format 1):
  manifest.json                  what the server needs to know without the model's code
  params/                        orbax StandardCheckpointer of {"leaves": {"00000": array, ...}}
  <signature>.<platform>.jaxexport   serialized `jax.export.Exported`, one per platform
  <signature>.<platform>.s<S>.jaxexport   ... one per platform and sequence bucket S, for
                                 signatures with a "seq" dimension (symbolic batch, concrete
                                 sequence: Pallas kernels need static sequence lengths)

A signature's `artifacts` maps `artifact_key(platform, seq)` ("cpu", "cpu@s64") to a file.
A predict bundle with several signatures is served as one model per signature
(`served_models`).

A signature of a model with categorical embedding tables may also carry `table_lookup`
(optional, so format 1 still): `<signature>.from_embeddings.<platform>.jaxexport`, the same
computation from already looked-up embeddings, with the lookup it replaces (`TableLookup`).
The server uses it to serve table-wise (`embedding_tables`: whole tables on different
devices, fused into one row-sharded array the signature's own params could not take).

A signature may also carry `context` (optional, format 1 still): inputs sent once per request
(a user, a query) beside inputs sent once per candidate (ads). `<signature>.context.<platform>
.jaxexport` computes the context part's features once per request; the signature's artifacts
score candidates from their request's feature row (`ContextSplit`).

A manifest of kind "pipeline" has no params or StableHLO: its one signature is the pipeline's
inputs and outputs and its `pipeline` section the steps over served models (`PipelineSpec`).

Every exported function has the call convention `fn(params: list[Array], inputs:
dict[str, Array]) -> dict[str, Array]`; params are a flat list of leaves (exported
input trees accept only string keys, and NNX state with lists has int keys).

The bundle format is a leaf package: it imports nothing else of xlaserve, so a server reads
manifests without the exporter or any model code.
"""

from bundle.datatypes import (BY_NUMPY, BY_TRITON, DATATYPES, Datatype, numpy_dtype,
                              triton_datatype)
from bundle.manifest import (FORMAT_VERSION, BundleError, ContextSplit, Manifest, ParamSpec, Signature, TableLookup,
                             TensorSpec, artifact_key, check_seq_buckets, compute_code_hash,
                             smallest_bucket,
                             find_artifact,
                             only_signature, served_models)
from bundle.pipeline import OPS, PipelineSpec, Source, Step
from bundle.store import (MANIFEST, MODEL_NAME_RE, PARAMS_DIR, list_versions, read_manifest, restore_params,
                          write_bundle)
