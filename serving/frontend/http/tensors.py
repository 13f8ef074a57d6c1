"""KServe v2 HTTP/REST tensors: a JSON inference request (with Triton's binary tensor data
extension) in, a JSON (+ binary) inference response out.

The request becomes an object with a ModelInferRequest's attributes, so the gRPC codec
(`serving/frontend/codec.py`) validates it with the same checks and the same messages; a binary
input is a memoryview of the body (`np.frombuffer` on it: no copy, no per-element work), a JSON
input's `data` is converted to numpy only when the codec asks for it, after its own checks.

Binary data (spec: Triton `docs/protocol/extension_binary_data.md`): the body is a JSON header of
`Inference-Header-Content-Length` bytes followed by the inputs' bytes, in input order, each
input saying its size in `parameters.binary_data_size`. Outputs are binary when the output asks
(`parameters.binary_data`) or, by default, when the request asks (`binary_data_output`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from bundle import BY_TRITON, TensorSpec, numpy_dtype
from serving.frontend import codec
from serving.types import Code, ServingError

JSON_TYPE = b"application/json"
BINARY_TYPE = b"application/octet-stream"
HEADER_LENGTH = b"inference-header-content-length"


def bad(msg: str) -> ServingError:
  """An INVALID_ARGUMENT error (HTTP 400)."""
  return ServingError(Code.INVALID_ARGUMENT, msg)


def _flatten(data: list, out: list) -> list:
  for v in data:
    if isinstance(v, list):
      _flatten(v, out)
    else:
      out.append(v)
  return out


class JsonContents:
  """A JSON input's `data`, read by the codec as a typed-contents field (`fp32_contents`, ...):
  flattened (row-major) and converted to the request's datatype when first asked for."""

  __slots__ = ("_name", "_datatype", "_data")

  def __init__(self, name: str, datatype: str, data: list):
    self._name, self._datatype, self._data = name, datatype, data

  def __getattr__(self, field: str) -> Any:
    if field.startswith("__"):
      raise AttributeError(field)
    data = self._data
    if data and isinstance(data[0], list):
      data = _flatten(data, [])
    if field == "bytes_contents":
      if not all(isinstance(v, str) for v in data):
        raise bad(f"input {self._name!r}: BYTES 'data' must hold strings")
      return [v.encode("utf-8") for v in data]
    known = BY_TRITON.get(self._datatype)
    try:
      return np.asarray(data, dtype=numpy_dtype(known.numpy))
    except (ValueError, TypeError, OverflowError):
      raise bad(f"input {self._name!r}: 'data' holds values that are not"
                f" {self._datatype}") from None


class JsonInput:
  """One input tensor, with the attributes of a gRPC InferInputTensor."""

  __slots__ = ("name", "shape", "datatype", "contents")
  data_label = "its JSON 'data'"  # where the codec's messages say the values are
  raw_label = "binary data (parameters.binary_data_size)"

  def __init__(self, name: str, shape: tuple[int, ...], datatype: str,
               contents: JsonContents | None):
    self.name, self.shape, self.datatype, self.contents = name, shape, datatype, contents


class RequestedOutput:
  """One entry of the request's `outputs`: its name and whether it comes back binary."""

  __slots__ = ("name", "binary")

  def __init__(self, name: str, binary: bool):
    self.name, self.binary = name, binary


class HttpInferRequest:
  """An inference request read from HTTP, with the attributes the codec and servicer read from a
  ModelInferRequest; `raw_input_contents` holds each input's bytes, or None for JSON data."""

  __slots__ = ("model_name", "model_version", "id", "inputs", "raw_input_contents", "outputs",
               "parameters", "binary_output")

  def __init__(self, model_name: str, model_version: str):
    self.model_name, self.model_version = model_name, model_version
    self.id = ""
    self.inputs: list[JsonInput] = []
    self.raw_input_contents: list[memoryview | None] = []
    self.outputs: list[RequestedOutput] = []
    self.parameters: dict[str, Any] = {}
    self.binary_output = False  # the request's binary_data_output: the outputs' default


def header_length(value: bytes | None, body_len: int) -> int | None:
  """The JSON header's length from `Inference-Header-Content-Length` (None: all JSON)."""
  if value is None:
    return None
  try:
    n = int(value)
  except ValueError:
    n = -1
  if not 0 <= n <= body_len:
    raise bad(f"Inference-Header-Content-Length {value.decode('latin-1')!r} must be an integer"
              f" from 0 to the body's length ({body_len})")
  return n


def load_json(data: bytes, what: str = "the request body") -> dict:
  """A JSON object, or INVALID_ARGUMENT naming what is wrong with it."""
  try:
    obj = json.loads(data)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
    raise bad(f"{what} is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise bad(f"{what} must be a JSON object")
  return obj


def parameters_of(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The `parameters` object of a request or tensor: scalar values only, as Triton takes."""
  params = obj.get("parameters", {})
  if not isinstance(params, dict):
    raise bad(f"{where}: 'parameters' must be a JSON object")
  for key, value in params.items():
    if not isinstance(value, (str, int, float, bool)):
      raise bad(f"{where}: parameter {key!r} must be a string, number or boolean")
  return params


def _shape(t: Mapping[str, Any], name: str) -> tuple[int, ...]:
  shape = t.get("shape")
  if type(shape) is not list or any(type(d) is not int for d in shape):
    raise bad(f"input {name!r}: 'shape' must be a list of integers")
  return tuple(shape)


def _read_input(t: Any, req: HttpInferRequest, binary: memoryview, offset: int) -> int:
  """Appends one input of the JSON `inputs` list to `req`; returns the new binary offset."""
  if not isinstance(t, dict) or not isinstance(t.get("name"), str):
    raise bad("each entry of 'inputs' must be an object with a string 'name'")
  name = t["name"]
  datatype = t.get("datatype")
  if not isinstance(datatype, str):
    raise bad(f"input {name!r}: 'datatype' must be a string such as \"FP32\"")
  shape = _shape(t, name)
  params = t.get("parameters")
  if params is not None and not isinstance(params, dict):
    raise bad(f"input {name!r}: 'parameters' must be a JSON object")
  size = params.get("binary_data_size") if params else None
  if size is not None:
    if type(size) is not int or size < 0:
      raise bad(f"input {name!r}: binary_data_size must be a non-negative integer")
    if offset + size > len(binary):
      raise bad(f"input {name!r}: binary_data_size {size} runs past the binary data"
                f" ({len(binary) - offset} bytes left after the JSON header)")
    req.inputs.append(JsonInput(name, shape, datatype, None))
    req.raw_input_contents.append(binary[offset:offset + size])
    return offset + size
  data = t.get("data")
  if not isinstance(data, list):
    raise bad(f"input {name!r}: give its values in 'data' (a list) or as binary data"
              " (parameters.binary_data_size)")
  req.inputs.append(JsonInput(name, shape, datatype, JsonContents(name, datatype, data)))
  req.raw_input_contents.append(None)
  return offset


def _read_outputs(head: Mapping[str, Any], req: HttpInferRequest) -> None:
  outputs = head.get("outputs", [])
  if not isinstance(outputs, list):
    raise bad("'outputs' must be a list")
  for o in outputs:
    if not isinstance(o, dict) or not isinstance(o.get("name"), str):
      raise bad("each entry of 'outputs' must be an object with a string 'name'")
    params = parameters_of(o, f"output {o['name']!r}")
    if params.get("classification"):
      raise bad(f"output {o['name']!r}: the classification extension is not supported")
    binary = params.get("binary_data", req.binary_output)
    if not isinstance(binary, bool):
      raise bad(f"output {o['name']!r}: binary_data must be true or false")
    req.outputs.append(RequestedOutput(o["name"], binary))


def parse_infer_request(model: str, version: str, body: bytes,
                        header_len: int | None) -> HttpInferRequest:
  """The inference request in `body` (JSON, then binary data when `header_len` is given)."""
  view = memoryview(body)
  if header_len is None:
    head, binary = load_json(body), view[:0]
  else:
    head, binary = load_json(body[:header_len]), view[header_len:]
  req = HttpInferRequest(model, version)
  rid = head.get("id", "")
  if not isinstance(rid, str):
    raise bad("'id' must be a string")
  req.id = rid
  params = parameters_of(head, "the request")
  binary_output = params.pop("binary_data_output", False)
  if not isinstance(binary_output, bool):
    raise bad("parameter 'binary_data_output' must be true or false")
  req.parameters, req.binary_output = params, binary_output
  inputs = head.get("inputs")
  if not isinstance(inputs, list):
    raise bad("the request needs 'inputs': a list of tensors")
  offset = 0
  for t in inputs:
    offset = _read_input(t, req, binary, offset)
  if offset != len(binary):
    raise bad(f"{len(binary) - offset} bytes of binary data after the JSON header belong to no"
              " input (the inputs' binary_data_size add up to less than the data sent)")
  _read_outputs(head, req)
  return req


def json_values(arr: np.ndarray) -> list:
  """A tensor's values as a flat JSON list (BYTES as UTF-8 text, invalid bytes replaced)."""
  flat = arr.reshape(-1)
  if arr.dtype == object:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
  if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
    flat = flat.astype(np.float32)
  return flat.tolist()


def tensor_bytes(arr: np.ndarray) -> bytes | np.ndarray:
  """A tensor's binary data: BYTES length-prefixed as in gRPC, else its contiguous buffer."""
  return codec.encode_bytes_tensor(arr) if arr.dtype == object else np.ascontiguousarray(arr)


def encode_infer_response(request: HttpInferRequest, version: int,
                          outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec],
                          generations: tuple[int, int] = (0, 0)) -> tuple[bytes, int | None]:
  """(body, JSON header length or None when every output is JSON): the inference response with
  each output binary or JSON as the request asked."""
  binary_of = {o.name: o.binary for o in request.outputs}
  entries, chunks = [], []
  for spec in specs:
    arr = outputs[spec.name]
    entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype,
                             "shape": list(arr.shape)}
    if binary_of.get(spec.name, request.binary_output):
      data = tensor_bytes(arr)
      entry["parameters"] = {"binary_data_size": data.nbytes if isinstance(data, np.ndarray)
                             else len(data)}
      chunks.append(data)
    else:
      entry["data"] = json_values(arr)
    entries.append(entry)
  head = {"model_name": request.model_name, "model_version": str(version), "outputs": entries}
  if request.id:
    head["id"] = request.id
  if params := codec.generation_params(generations):
    head["parameters"] = params
  header = json.dumps(head, separators=(",", ":")).encode()
  if not chunks:
    return header, None
  return b"".join([header, *chunks]), len(header)


