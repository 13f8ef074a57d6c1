"""Triton/KServe v2 tensors <-> numpy, validated against a signature; no per-element Python work.

Raw bytes become arrays with `np.frombuffer` (zero copy); typed `contents` go through
numpy's array constructor on the repeated field. Every check names the input and
what was expected, and happens before any large allocation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from bundle import BY_TRITON, TensorSpec, numpy_dtype
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.types import Code, ServingError

PARAMS_GENERATION = "params_generation"  # response parameter: see generation_params

@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
  """Size limits enforced before allocating."""

  max_rows: int = 65536
  max_tensor_bytes: int = 64 << 20

  def __post_init__(self):
    if self.max_rows < 1 or self.max_tensor_bytes < 1:
      raise ValueError("limits must be positive")


def _bad(msg: str) -> ServingError:
  return ServingError(Code.INVALID_ARGUMENT, msg)


def _is_int(dt: np.dtype) -> bool:
  return dt.kind in "iu"


def _where(t: Any, field: str) -> str:
  """Where a tensor's typed values travel, for messages: `contents.<field>` in gRPC; a front end
  whose tensor objects carry `data_label` (HTTP: its JSON `data`) names its own place."""
  return getattr(t, "data_label", None) or f"contents.{field}"


def decode_inputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec], limits: Limits
) -> tuple[dict[str, np.ndarray], int]:
  """Returns {input name: array} in the signature's dtypes and the shared row count.

  `request` is a ModelInferRequest or any object with its attributes (the HTTP front end's,
  whose `raw_input_contents` holds a buffer or None per input)."""
  by_name = {s.name: s for s in specs}
  raw = request.raw_input_contents
  if raw and len(raw) != len(request.inputs):
    raise _bad(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send raw bytes"
               " for every input or for none")
  arrays: dict[str, np.ndarray] = {}
  rows = None
  for i, t in enumerate(request.inputs):
    spec = by_name.get(t.name)
    if spec is None:
      raise _bad(f"unexpected input {t.name!r}; model {request.model_name!r} takes"
                 f" {sorted(by_name)}")
    if t.name in arrays:
      raise _bad(f"input {t.name!r} given twice")
    shape = tuple(t.shape)
    if len(shape) != len(spec.shape):
      raise _bad(f"input {t.name!r}: shape {list(shape)} has rank {len(shape)}, expected"
                 f" {list(spec.shape)} (-1 is the batch dimension)")
    per_request = spec.per_request  # a context input: one row per request
    if per_request and shape[:1] != (1,):
      raise _bad(f"input {t.name!r} is a context input: one row per request (shape"
                 f" {list(spec.shape)}), got shape {list(shape)}; send the candidates' rows in"
                 " the other inputs")
    for d, (got, want) in enumerate(zip(shape, spec.shape)):
      if got < (1 if want == -1 else 0) or (want != -1 and got != want):
        raise _bad(f"input {t.name!r}: shape {list(shape)} does not match {list(spec.shape)}"
                   f" at dimension {d}")
    n_rows = shape[0]
    if per_request:
      pass
    elif rows is None:
      rows = n_rows
    elif n_rows != rows:
      raise _bad(f"input {t.name!r} has {n_rows} rows but another input has {rows}: every input"
                 " needs the same batch dimension")
    if n_rows > limits.max_rows:
      raise ServingError(Code.INVALID_ARGUMENT, f"input {t.name!r}: {n_rows} rows exceed the"
                         f" limit of {limits.max_rows} per request; split the request")
    if t.datatype == "BYTES" or spec.dtype == "object":
      if t.datatype != spec.datatype:
        raise _bad(f"input {t.name!r}: datatype {t.datatype} given, expected {spec.datatype}")
      arrays[t.name] = _decode_bytes_tensor(t, raw[i] if raw else None, shape, limits)
      continue
    arrays[t.name] = _decode_numeric(t, spec, raw[i] if raw else None, shape, limits)
  missing = sorted(set(by_name) - set(arrays))
  if missing:
    raise _bad(f"missing inputs {missing}; model {request.model_name!r} takes"
               f" {[s.name for s in specs]}")
  return arrays, rows or 0


def _decode_numeric(t: Any, spec: TensorSpec, data: bytes | None, shape: tuple[int, ...],
                    limits: Limits) -> np.ndarray:
  """One numeric input from raw bytes (zero copy) or typed contents, in the spec's dtype."""
  known = BY_TRITON.get(t.datatype)
  if known is None or known.numpy == "object":
    raise _bad(f"input {t.name!r}: unsupported datatype {t.datatype!r}")
  got_dt = numpy_dtype(known.numpy)
  want_dt = numpy_dtype(spec.dtype)
  if got_dt != want_dt and not (_is_int(got_dt) and _is_int(want_dt)):
    raise _bad(f"input {t.name!r}: datatype {t.datatype} given, expected {spec.datatype}")
  count = math.prod(shape)
  nbytes = count * got_dt.itemsize
  if nbytes > limits.max_tensor_bytes:
    raise _bad(f"input {t.name!r}: {nbytes} bytes exceed the limit of"
               f" {limits.max_tensor_bytes} per tensor")
  if data is not None:
    if len(data) != nbytes:
      raise _bad(f"input {t.name!r}: {len(data)} raw bytes, expected {nbytes} for shape"
                 f" {list(shape)} of {t.datatype}")
    arr = np.frombuffer(data, dtype=got_dt).reshape(shape)
  else:
    field = known.contents_field  # BF16 and FP16 travel as raw bytes only
    if field is None:
      raise _bad(f"input {t.name!r}: {t.datatype} must be sent in"
                 f" {getattr(t, 'raw_label', 'raw_input_contents')}")
    values = getattr(t.contents, field)
    if len(values) != count:
      raise _bad(f"input {t.name!r}: {len(values)} values in {_where(t, field)}, expected"
                 f" {count} for shape {list(shape)}")
    arr = np.asarray(values, dtype=got_dt).reshape(shape)
  if got_dt != want_dt:
    info = np.iinfo(want_dt)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
      raise _bad(f"input {t.name!r}: values outside {spec.datatype} range; send"
                 f" {spec.datatype}")
    arr = arr.astype(want_dt)
  return arr


def _decode_bytes_tensor(t: Any, data: bytes | None, shape: tuple[int, ...],
                         limits: Limits) -> np.ndarray:
  """BYTES: each element is a 4-byte little-endian length and that many bytes (raw), or
  `contents.bytes_contents` (typed); returns an object array of `bytes`."""
  count = math.prod(shape)
  if data is None:
    values = list(t.contents.bytes_contents)
    if len(values) != count:
      raise _bad(f"input {t.name!r}: {len(values)} values in {_where(t, 'bytes_contents')},"
                 f" expected {count} for shape {list(shape)}")
  else:
    if len(data) > limits.max_tensor_bytes:
      raise _bad(f"input {t.name!r}: {len(data)} bytes exceed the limit of"
                 f" {limits.max_tensor_bytes} per tensor")
    values = bytes_elements(t.name, data, count)
  arr = np.empty(count, dtype=object)
  arr[:] = values
  return arr.reshape(shape)


def bytes_elements(name: str, data: Any, count: int, *, exact: bool = True) -> list[bytes]:
  """`count` BYTES elements (each a 4-byte little-endian length and that many bytes) from the
  start of `data`; with `exact`, nothing may follow them."""
  values, pos = [], 0
  for _ in range(count):
    if pos + 4 > len(data):
      raise _bad(f"input {name!r}: BYTES data ends inside an element length; each element"
                 " is a 4-byte little-endian length followed by its bytes")
    n = int.from_bytes(data[pos:pos + 4], "little")
    pos += 4
    if pos + n > len(data):
      raise _bad(f"input {name!r}: BYTES element of {n} bytes runs past the data")
    values.append(bytes(data[pos:pos + n]))
    pos += n
  if exact and pos != len(data):
    raise _bad(f"input {name!r}: {len(data) - pos} bytes left after {count} BYTES elements")
  return values


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
  """Serializes an object array of bytes/str as Triton BYTES raw data."""
  out = bytearray()
  for v in arr.reshape(-1):
    b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    out += len(b).to_bytes(4, "little") + b
  return bytes(out)


def requested_outputs(request: pb.ModelInferRequest, specs: Sequence[TensorSpec]) -> list[TensorSpec]:
  """The outputs the client asked for (all by default), in request order."""
  if not request.outputs:
    return list(specs)
  by_name = {s.name: s for s in specs}
  out = []
  for o in request.outputs:
    if o.name not in by_name:
      raise _bad(f"unknown output {o.name!r}; model has {sorted(by_name)}")
    out.append(by_name[o.name])
  return out


def encode_response(
    request: pb.ModelInferRequest, version: int, outputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec], generations: tuple[int, int] = (0, 0),
) -> pb.ModelInferResponse:
  """Builds the response with raw_output_contents (one bytes copy per output), and the params
  generations that scored it once live updates have changed them."""
  resp = pb.ModelInferResponse(model_name=request.model_name, model_version=str(version),
                               id=request.id)
  for key, value in generation_params(generations).items():
    resp.parameters[key].int64_param = value
  for spec in specs:
    arr = outputs[spec.name]
    resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=arr.shape)
    resp.raw_output_contents.append(encode_bytes_tensor(arr) if arr.dtype == object
                                    else np.ascontiguousarray(arr).tobytes())
  return resp


def generation_params(generations: tuple[int, int]) -> dict[str, int]:
  """Response parameters naming the params generation that scored a request: none before the
  first live update; `params_generation_min` too when a split request straddled an update."""
  lo, hi = generations
  if hi <= 0:
    return {}
  return {PARAMS_GENERATION: hi} if lo == hi else {PARAMS_GENERATION: hi,
                                                   PARAMS_GENERATION + "_min": lo}


def param_value(p: Any) -> Any:
  """The Python value of an InferParameter oneof (a plain value, as JSON gives, stays as is)."""
  if not isinstance(p, pb.InferParameter):
    return p
  which = p.WhichOneof("parameter_choice")
  return None if which is None else getattr(p, which)
