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

Every exported function has the call convention `fn(params: list[Array], inputs:
dict[str, Array]) -> dict[str, Array]`; params are a flat list of leaves (exported
input trees accept only string keys, and NNX state with lists has int keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"

# Triton datatype name <-> numpy dtype name.
TRITON_DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
    "BYTES": "object",
}
DTYPE_TO_TRITON: dict[str, str] = {v: k for k, v in TRITON_DATATYPES.items()}


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
    if self.dtype not in DTYPE_TO_TRITON:
      raise ValueError(f"{self.name}: unsupported dtype {self.dtype!r}")
    for d, n in zip(self.dims, self.shape):
      if (d is not None) != (n == -1):
        raise ValueError(f"{self.name}: bucketed dims must have size -1: {self.shape} {self.dims}")

  @property
  def datatype(self) -> str:
    return DTYPE_TO_TRITON[self.dtype]

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
class Signature:
  """One callable entry point of a bundle."""

  name: str
  inputs: tuple[TensorSpec, ...]
  outputs: tuple[TensorSpec, ...]
  artifacts: Mapping[str, str]  # artifact_key(platform, seq) -> file name
  seq_buckets: tuple[int, ...] = ()  # this signature's own sequence buckets; () -> the manifest's
  table_lookup: TableLookup | None = None  # the split for table-wise serving, if exported

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


def write_bundle(
    directory: str | os.PathLike[str],
    manifest: Manifest,
    params: Sequence[Any],
    artifacts: Mapping[str, bytes],
) -> pathlib.Path:
  """Writes params (orbax), artifacts and the manifest (last, so a bundle is complete when it appears)."""
  import orbax.checkpoint as ocp  # heavy; imported on use

  path = pathlib.Path(directory).absolute()
  if (path / MANIFEST).exists():
    raise BundleError(f"{path} already holds a bundle; choose another version")
  path.mkdir(parents=True, exist_ok=True)
  if len(params) != len(manifest.params):
    raise ValueError(f"{len(params)} param leaves but {len(manifest.params)} specs")
  tree = {"leaves": {f"{i:05d}": np.asarray(p) if not hasattr(p, "sharding") else p
                     for i, p in enumerate(params)}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / PARAMS_DIR, tree)
  for fname, blob in artifacts.items():
    (path / fname).write_bytes(blob)
  tmp = path / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest.to_json(), indent=1))
  tmp.rename(path / MANIFEST)
  logger.info("wrote bundle %s (%d params, %s)", path, len(params), sorted(artifacts))
  return path


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
  """Reads and validates `manifest.json`; raises BundleError with what to do."""
  path = pathlib.Path(directory) / MANIFEST
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise BundleError(f"no {MANIFEST} in {directory}: not an exported bundle") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BundleError(f"{path} is not valid JSON ({e}); re-export the model") from e
  try:
    return Manifest.from_json(data)
  except (KeyError, TypeError, ValueError) as e:
    raise BundleError(f"{path} is malformed ({type(e).__name__}: {e}); re-export the model") from e


def restore_params(
    directory: str | os.PathLike[str],
    manifest: Manifest,
    shardings: Sequence[Any] | None = None,
) -> list[Any]:
  """Restores the flat param leaves, straight into `shardings` when given (no host copy first)."""
  import jax
  import orbax.checkpoint as ocp

  def target(i: int, p: ParamSpec) -> jax.ShapeDtypeStruct:
    sharding = shardings[i] if shardings is not None else jax.sharding.SingleDeviceSharding(
        jax.devices()[0])
    return jax.ShapeDtypeStruct(p.shape, np.dtype(p.dtype) if p.dtype != "bfloat16"
                                else jax.numpy.bfloat16, sharding=sharding)

  abstract = {"leaves": {f"{i:05d}": target(i, p) for i, p in enumerate(manifest.params)}}
  ckpt = pathlib.Path(directory).absolute() / PARAMS_DIR
  if not ckpt.exists():
    raise BundleError(f"{ckpt} is missing: the bundle is incomplete; re-export the model")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(ckpt, abstract)
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise BundleError(f"cannot restore params from {ckpt}: {type(e).__name__}: {e}") from e
  return [restored["leaves"][f"{i:05d}"] for i in range(len(manifest.params))]


def list_versions(model_dir: str | os.PathLike[str]) -> list[int]:
  """Numeric version folders under `<repo>/<model>/`, ascending."""
  path = pathlib.Path(model_dir)
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
