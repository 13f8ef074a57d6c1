"""Manifest schema of a serving bundle: tensor, param and signature specs, artifact keys.

See `bundle/__init__.py` for the layout on disk.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping, Sequence

from bundle.datatypes import BY_NUMPY
from bundle.pipeline import PipelineSpec

FORMAT_VERSION = 1


class BundleError(Exception):
  """A bundle is missing, malformed, or was written by an incompatible version."""


@dataclasses.dataclass(frozen=True, slots=True)
class TensorSpec:
  """One named input or output. `shape` uses -1 for bucketed dims; `dims` names them."""

  name: str
  dtype: str  # numpy dtype name, e.g. "float32", "bfloat16"
  shape: tuple[int, ...]
  dims: tuple[str | None, ...]  # "batch", "seq" or None per dimension

  def __post_init__(self):
    if len(self.shape) != len(self.dims):
      raise ValueError(f"{self.name}: shape {self.shape} and dims {self.dims} differ in rank")
    if self.dtype not in BY_NUMPY:
      raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}")
    for d, n in zip(self.dims, self.shape):
      if (d is not None) != (n == -1):
        raise ValueError(f"{self.name}: bucketed dims must have size -1: {self.shape} {self.dims}")

  @property
  def datatype(self) -> str:
    return BY_NUMPY[self.dtype].triton

  @property
  def per_request(self) -> bool:
    """A context input: a fixed leading 1, one row per request (not per candidate)."""
    return bool(self.dims) and self.dims[0] is None and self.shape[0] == 1

  def to_json(self) -> dict[str, Any]:
    return {
        "name": self.name,
        "dtype": self.dtype,
        "datatype": self.datatype,
        "shape": list(self.shape),
        "dims": list(self.dims),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
    return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["dims"]))


@dataclasses.dataclass(frozen=True, slots=True)
class ParamSpec:
  """One flat parameter leaf: where it came from, its shape, dtype and logical axes."""

  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple[str | None, ...] | None

  def to_json(self) -> dict[str, Any]:
    return {
        "path": self.path,
        "shape": list(self.shape),
        "dtype": self.dtype,
        "logical_axes": None if self.logical_axes is None else list(self.logical_axes),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ParamSpec:
    axes = d.get("logical_axes")
    return cls(d["path"], tuple(d["shape"]), d["dtype"], None if axes is None else tuple(axes))


@dataclasses.dataclass(frozen=True, slots=True)
class TableLookup:
  """The embedding lookup a signature can be split at, and the artifact that runs the rest.

  The lookup: `ids_input` [B, F] ids; feature f reads param leaf `tables[f]` ([rows[f], dim]),
  id taken modulo rows[f] (the hashing trick), a negative id gives a zero vector; 8-bit
  tables (`table_dtype` int8/uint8) are dequantized per row as codes * scale + offset with
  `scales[f]`, `offsets[f]` ([rows[f]] float32 leaves). The result, [B, F, dim] float32, is
  the input `embeddings_input` of `artifacts`, which take the params that are not table
  leaves (in order) and the signature's other inputs: `fn(params, inputs) -> outputs`.
  """

  ids_input: str
  embeddings_input: str
  tables: tuple[int, ...]
  rows: tuple[int, ...]
  dim: int
  table_dtype: str
  artifacts: Mapping[str, str]  # artifact_key(platform, None, batch) -> file name
  scales: tuple[int, ...] = ()  # empty unless 8-bit
  offsets: tuple[int, ...] = ()

  def __post_init__(self):
    n = len(self.tables)
    if not n or len(self.rows) != n:
      raise ValueError(f"table_lookup: {n} tables but {len(self.rows)} row counts")
    if (self.scales or self.offsets) and not len(self.scales) == len(self.offsets) == n:
      raise ValueError("table_lookup: scales and offsets need one leaf per table")

  @property
  def table_leaves(self) -> frozenset[int]:
    """Every param leaf the lookup reads (tables, scales, offsets): not the artifact's params."""
    return frozenset(self.tables) | frozenset(self.scales) | frozenset(self.offsets)

  def to_json(self) -> dict[str, Any]:
    d = {"ids_input": self.ids_input, "embeddings_input": self.embeddings_input,
         "tables": list(self.tables), "rows": list(self.rows), "dim": self.dim,
         "table_dtype": self.table_dtype, "ids": "modulo rows; negative -> zero vector",
         "artifacts": dict(self.artifacts)}
    if self.scales:
      d.update(scales=list(self.scales), offsets=list(self.offsets),
               dequantize="codes * scale + offset")
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> TableLookup:
    return cls(d["ids_input"], d["embeddings_input"], tuple(d["tables"]), tuple(d["rows"]),
               int(d["dim"]), d["table_dtype"], dict(d["artifacts"]),
               tuple(d.get("scales", ())), tuple(d.get("offsets", ())))


@dataclasses.dataclass(frozen=True, slots=True)
class ContextSplit:
  """A signature served in two parts: once per request (context) and once per candidate.

  `inputs` name the signature's context inputs (one row per request: shape [1, ...]); the
  others are candidate inputs (N rows). `artifacts` run the context part:
  `fn(params, {context inputs at R rows}) -> {features [R, ...]}`; the signature's own
  artifacts score candidates: `fn(params, {features [C, ...] (each candidate's request row),
  candidate inputs [C, ...]}) -> outputs [C, ...]`. The server runs the context part at a
  bucket of `request_buckets` and the scoring part at a batch bucket, and gathers each
  candidate's feature row between the two on the device.
  """

  inputs: tuple[str, ...]
  features: tuple[TensorSpec, ...]
  artifacts: Mapping[str, str]  # artifact_key(platform, None, batch) -> file name
  request_buckets: tuple[int, ...]

  def __post_init__(self):
    if not self.inputs or not self.features:
      raise ValueError("context: needs at least one context input and one feature")
    b = self.request_buckets
    if not b or list(b) != sorted(set(b)) or b[0] < 1:
      raise ValueError(f"context: request_buckets must be positive and strictly increasing,"
                       f" got {b}")
    for t in self.features:
      if not t.dims or t.dims[0] != "batch" or "seq" in t.dims:
        raise ValueError(f"context feature {t.name!r}: dims {t.dims} must be ('batch', fixed...)")

  def to_json(self) -> dict[str, Any]:
    return {"inputs": list(self.inputs), "features": [t.to_json() for t in self.features],
            "artifacts": dict(self.artifacts), "request_buckets": list(self.request_buckets)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> ContextSplit:
    return cls(tuple(d["inputs"]), tuple(TensorSpec.from_json(t) for t in d["features"]),
               dict(d["artifacts"]), tuple(int(b) for b in d["request_buckets"]))


@dataclasses.dataclass(frozen=True, slots=True)
class Signature:
  """One callable entry point of a bundle."""

  name: str
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  artifacts: Mapping[str, str]  # artifact_key(platform, seq) -> file name
  seq_buckets: tuple[int, ...] = ()  # this signature's own sequence buckets; () -> the manifest's
  table_lookup: TableLookup | None = None  # the split for table-wise serving, if exported
  context: ContextSplit | None = None  # context inputs computed once per request, if any

  def __post_init__(self):
    if self.context is None:
      return
    names = {t.name: t for t in self.inputs}
    for n in self.context.inputs:
      t = names.get(n)
      if t is None or not t.per_request:
        raise ValueError(f"signature {self.name!r}: context input {n!r} must be an input of"
                         " shape [1, ...] (one row per request)")
    if all(n in self.context.inputs for n in names):
      raise ValueError(f"signature {self.name!r}: a context model needs a candidate input")
    if self.table_lookup is not None or self.has_seq:
      raise ValueError(f"signature {self.name!r}: context inputs do not combine with"
                       " table-wise serving or sequence inputs yet")

  @property
  def candidate_inputs(self) -> tuple[TensorSpec, ...]:
    """The inputs with one row per candidate (all of them when there is no context part)."""
    ctx = self.context.inputs if self.context else ()
    return tuple(t for t in self.inputs if t.name not in ctx)

  @property
  def has_seq(self) -> bool:
    """Whether any input has a "seq" dimension (served on a 2-D batch x sequence grid)."""
    return any("seq" in t.dims for t in self.inputs)

  def to_json(self) -> dict[str, Any]:
    d = {
        "inputs": [t.to_json() for t in self.inputs],
        "outputs": [t.to_json() for t in self.outputs],
        "artifacts": dict(self.artifacts),
    }
    if self.seq_buckets:
      d["seq_buckets"] = list(self.seq_buckets)
    if self.table_lookup is not None:
      d["table_lookup"] = self.table_lookup.to_json()
    if self.context is not None:
      d["context"] = self.context.to_json()
    return d

  @classmethod
  def from_json(cls, name: str, d: Mapping[str, Any]) -> Signature:
    return cls(
        name,
        tuple(TensorSpec.from_json(t) for t in d["inputs"]),
        tuple(TensorSpec.from_json(t) for t in d["outputs"]),
        dict(d["artifacts"]),
        tuple(int(s) for s in d.get("seq_buckets", ())),
        TableLookup.from_json(d["table_lookup"]) if d.get("table_lookup") else None,
        ContextSplit.from_json(d["context"]) if d.get("context") else None,
    )


def artifact_key(platform: str, seq: int | None = None, batch: int | None = None) -> str:
  """Key of a signature's artifact: "cpu" (symbolic batch, no sequence), "cpu@s64" (sequence
  64), "cuda@b32@s64" (batch fixed at 32: GPU kernels need static grids)."""
  key = platform if batch is None else f"{platform}@b{batch}"
  return key if seq is None else f"{key}@s{seq}"


def find_artifact(artifacts: Mapping[str, str], platform: str, *, batch: int,
                  seq: int | None = None) -> str | None:
  """The file for one (batch, seq) shape: a fixed-batch artifact first, then a symbolic one."""
  for key in (artifact_key(platform, seq, batch), artifact_key(platform, seq),
              artifact_key(platform)):
    if key in artifacts:
      return artifacts[key]
  return None


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
  """Everything the server reads about a bundle before touching params or StableHLO."""

  name: str
  version: int
  kind: str  # "predict" or "generate"
  jax_version: str
  signatures: Mapping[str, Signature]
  params: tuple[ParamSpec, ...]
  batch_buckets: tuple[int, ...]
  seq_buckets: tuple[int, ...] = ()
  quantization: str = "none"
  code_hash: str = ""
  serving: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  format_version: int = FORMAT_VERSION
  pipeline: PipelineSpec | None = None  # kind "pipeline": its steps (bundle/pipeline.py)

  def __post_init__(self):
    if (self.kind == "pipeline") != (self.pipeline is not None):
      raise ValueError(f"kind {self.kind!r}: a pipeline section goes with kind 'pipeline' only")
    if self.pipeline is not None:
      if len(self.signatures) != 1:
        raise ValueError("a pipeline has one signature: its inputs and outputs")
      sig = next(iter(self.signatures.values()))
      self.pipeline.check(tuple(t.name for t in sig.inputs), tuple(t.name for t in sig.outputs))

  def to_json(self) -> dict[str, Any]:
    return {
        "format_version": self.format_version,
        "name": self.name,
        "version": self.version,
        "kind": self.kind,
        "jax_version": self.jax_version,
        "code_hash": self.code_hash,
        "quantization": self.quantization,
        "batch_buckets": list(self.batch_buckets),
        "seq_buckets": list(self.seq_buckets),
        "serving": dict(self.serving),
        "signatures": {k: s.to_json() for k, s in self.signatures.items()},
        "params": [p.to_json() for p in self.params],
        "extra": dict(self.extra),
        **({"pipeline": self.pipeline.to_json()} if self.pipeline is not None else {}),
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> Manifest:
    fv = d.get("format_version")
    if fv != FORMAT_VERSION:
      raise BundleError(
          f"bundle format_version {fv!r} is not supported (this xlaserve reads {FORMAT_VERSION});"
          " re-export the model with this version of xlaserve"
      )
    return cls(
        name=d["name"],
        version=int(d["version"]),
        kind=d["kind"],
        jax_version=d["jax_version"],
        signatures={k: Signature.from_json(k, s) for k, s in d["signatures"].items()},
        params=tuple(ParamSpec.from_json(p) for p in d["params"]),
        batch_buckets=tuple(d["batch_buckets"]),
        seq_buckets=tuple(d.get("seq_buckets", ())),
        quantization=d.get("quantization", "none"),
        code_hash=d.get("code_hash", ""),
        serving=d.get("serving", {}),
        extra=d.get("extra", {}),
        pipeline=PipelineSpec.from_json(d["pipeline"]) if d.get("pipeline") else None,
    )


def served_models(name: str, manifest: Manifest) -> dict[str, str | None]:
  """Served model name -> signature for the bundle in folder `name`.

  A predict bundle with one signature is served as `name`; with several, each signature
  is its own model `<name>_<suffix>`, the suffix from the manifest's
  `serving["signature_suffixes"]` (set at export), else the signature name. Other kinds
  are one model (signature None: the engine uses all of them).
  """
  if manifest.kind != "predict" or len(manifest.signatures) == 1:
    return {name: next(iter(manifest.signatures)) if manifest.kind == "predict" else None}
  suffixes = manifest.serving.get("signature_suffixes", {})
  out: dict[str, str | None] = {}
  for sig in manifest.signatures:
    served = f"{name}_{suffixes.get(sig) or sig}"
    if served in out:
      raise BundleError(f"{name}: signatures {out[served]!r} and {sig!r} are both served as"
                        f" {served!r}; give them distinct signature_suffixes at export")
    out[served] = sig
  return out


def only_signature(manifest: Manifest, signature: str) -> Manifest:
  """The manifest seen by the model serving one signature of it."""
  if signature not in manifest.signatures:
    raise BundleError(f"{manifest.name}: no signature {signature!r} (has"
                      f" {sorted(manifest.signatures)})")
  return dataclasses.replace(manifest, signatures={signature: manifest.signatures[signature]})


def compute_code_hash(
    artifacts: Mapping[str, bytes], params: Sequence[ParamSpec], batch_buckets: Sequence[int],
    seq_buckets: Sequence[int] = (),
) -> str:
  """Stable hash of what changes compiled code: StableHLO, param shapes/dtypes, buckets."""
  h = hashlib.sha256()
  for name in sorted(artifacts):
    h.update(name.encode())
    h.update(hashlib.sha256(artifacts[name]).digest())
  h.update(json.dumps([(p.shape, p.dtype) for p in params]).encode())
  h.update(json.dumps([list(batch_buckets), list(seq_buckets)]).encode())
  return h.hexdigest()[:16]


def smallest_bucket(buckets: Sequence[int], n: int) -> int | None:
  """The smallest of the sorted `buckets` holding `n`, or None when `n` exceeds the largest."""
  i = bisect.bisect_left(buckets, n)
  return buckets[i] if i < len(buckets) else None


def check_seq_buckets(seq_buckets: Iterable[int]) -> tuple[int, ...]:
  """Validates a sequence bucket tuple (positive, strictly increasing) and returns it."""
  buckets = tuple(seq_buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
    raise ValueError(f"seq_buckets must be positive and strictly increasing, got {buckets}")
  return buckets
