"""Triton's generate extension: `POST .../generate` and `.../generate_stream`.

The body is one JSON object whose keys name the model's inputs (a scalar, or a list for a
tensor; the batch dimension is implied) plus optional `id` and `parameters` (sampling settings
for a generative model: max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos). The
answer names the outputs the same way: `{"model_name", "model_version", "text_output": ...}`.

`generate` answers once (a decoupled model's whole completion, as gRPC ModelInfer gives it);
`generate_stream` answers as server-sent events, `data: {...}` per released piece of text for a
decoupled model (as gRPC ModelStreamInfer streams it) and a single event for any other model;
an error after the stream began is an event `data: {"error": "..."}`. A client that goes away
cancels its generation at once.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from typing import Any, AsyncIterator, Mapping, Sequence

import numpy as np

from bundle import TensorSpec
from serving.frontend import codec, request_trace
from serving.frontend.http import tensors
from serving.frontend.http.app import HTTP_STATUS, Reply, Request, StreamReply, json_reply
from serving.frontend.servicer import InferenceServicer, log_outcome
from serving.types import SHUTTING_DOWN, Code, ServingError

_RESERVED = ("id", "parameters")


def _nested_shape(value: Any) -> list[int]:
  shape = []
  while isinstance(value, list):
    shape.append(len(value))
    value = value[0] if value else None
  return shape


def generate_request(body: bytes, model: str, version: str,
                     specs: Sequence[TensorSpec]) -> tensors.HttpInferRequest:
  """The generate body as an inference request over the model's inputs (`specs`)."""
  obj = tensors.load_json(body)
  req = tensors.HttpInferRequest(model, version)
  rid = obj.get("id", "")
  if not isinstance(rid, str):
    raise tensors.bad("'id' must be a string")
  req.id = rid
  req.parameters = tensors.parameters_of(obj, "the request")
  req.parameters.pop("stream", None)  # the endpoint decides that
  by_name = {s.name: s for s in specs}
  for name, value in obj.items():
    if name in _RESERVED:
      continue
    data = value if isinstance(value, list) else [value]
    shape = _nested_shape(data)
    spec = by_name.get(name)
    if spec is not None and len(shape) == len(spec.shape) - 1:
      shape = [1, *shape]  # the batch dimension, implied
    datatype = spec.datatype if spec is not None else "BYTES"
    req.inputs.append(tensors.JsonInput(name, tuple(shape), datatype,
                                        tensors.JsonContents(name, datatype, data)))
    req.raw_input_contents.append(None)
  return req


def generate_answer(model: str, version: int, request_id: str,
                    outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict:
  """The generate answer: each output by name, a scalar when it holds one element."""
  out: dict[str, Any] = {"model_name": model, "model_version": str(version)}
  if request_id:
    out["id"] = request_id
  for spec in specs:
    values = tensors.json_values(outputs[spec.name])
    out[spec.name] = values[0] if len(values) == 1 else values
  return out


def sse(obj: Any) -> bytes:
  """One server-sent event carrying `obj` as JSON."""
  return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Generation:
  """The two generate endpoints over the servicer's routing and validation."""

  def __init__(self, servicer: InferenceServicer):
    self.servicer = servicer
    self.trace_marker_secret: str | None = None  # the native relay's (Routes sets it)

  def _start(self, req: Request, model: str, version: str
             ) -> tuple[Any, Any, tensors.HttpInferRequest]:
    if self.servicer.refusing():
      raise ServingError(Code.UNAVAILABLE, SHUTTING_DOWN)
    rec, runner = self.servicer.route(model, version)
    return rec, runner, generate_request(req.body, model, version, runner.inputs)

  def _trace(self, req: Request, t0: float) -> Any:
    """The request's trace when tracing samples it (its headers decide), else None."""
    s = self.servicer
    return None if s.tracing is None else request_trace.start_http(
        s.tracing, req.headers, req.path, t0, self.trace_marker_secret)

  async def _infer(self, request: tensors.HttpInferRequest, model: str, version: str,
                   rt: Any = None) -> dict:
    t0 = time.perf_counter() if rt is None else rt.t0
    request_id = self.servicer.request_id(request.id)
    try:
      rec, outputs, specs, _ = await self.servicer.infer(request, None, t0, request_id, trace=rt)
    except ServingError as e:
      log_outcome(model, version, request_id, e, t0)
      if rt is not None:
        request_trace.finish_http(self.servicer.tracing, rt, request_id, HTTP_STATUS[e.code], e)
      raise
    log_outcome(model, version, request_id, None, t0)
    if rt is not None:
      request_trace.finish_http(self.servicer.tracing, rt, request_id, 200, None)
    return generate_answer(rec.name, rec.version, request.id, outputs, specs)

  async def generate(self, req: Request, model: str, version: str) -> Reply:
    """POST .../generate: one answer."""
    rt = self._trace(req, time.perf_counter())
    try:
      _, _, request = self._start(req, model, version)
    except ServingError as e:
      if rt is not None:
        request_trace.finish_http(self.servicer.tracing, rt, "", HTTP_STATUS[e.code], e)
      raise
    return json_reply(await self._infer(request, model, version, rt))

  async def generate_stream(self, req: Request, model: str, version: str) -> StreamReply:
    """POST .../generate_stream: server-sent events."""
    rec, runner, request = self._start(req, model, version)
    if not runner.capabilities.decoupled:
      rt = self._trace(req, time.perf_counter())
      return StreamReply(self._single(request, model, version, rt), cancel=lambda: None)
    arrays, _ = codec.decode_inputs(request, runner.inputs, self.servicer.limits)
    prompts = arrays["text_input"].reshape(-1)
    if len(prompts) != 1:
      raise ServingError(Code.INVALID_ARGUMENT, "stream one prompt per request (text_input"
                         f" has {len(prompts)} elements)")
    if (gate := self.servicer.tenant_gate) is not None:  # --tenants: a prompt is 1 row
      gate.admit(1, 0)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rt, tracing = self._trace(req, time.perf_counter()), self.servicer.tracing
    if rt is not None:
      rt.submitted(rec.name, rec.version, 1)

    def on_event(ev: Any) -> None:  # engine thread
      loop.call_soon_threadsafe(events.put_nowait, ev)
      if ev.finished and rt is not None:  # also when the client went away
        loop.call_soon_threadsafe(request_trace.finish_generation, tracing, rt, request.id, ev)

    handle = runner.stream(bytes(prompts[0]), dict(request.parameters), request.id, on_event)
    state = {"open": True}

    def cancel() -> None:
      if state["open"]:
        state["open"] = False
        handle.cancel()  # frees the slot and KV pages now
        events.put_nowait(None)

    head = {"model_name": rec.name, "model_version": str(rec.version)}
    if request.id:
      head["id"] = request.id
    return StreamReply(self._pieces(events, head, state), cancel)

  async def _single(self, request: tensors.HttpInferRequest, model: str,
                    version: str, rt: Any = None) -> AsyncIterator[bytes]:
    try:
      yield sse(await self._infer(request, model, version, rt))
    except ServingError as e:
      yield sse({"error": e.message})

  async def _pieces(self, events: asyncio.Queue, head: dict,
                    state: dict) -> AsyncIterator[bytes]:
    """One event per released piece of text until the generation finishes."""
    text = codecs.getincrementaldecoder("utf-8")("replace")  # a piece may split a character
    while True:
      ev = await events.get()
      if ev is None:  # cancelled
        return
      if ev.error is not None:
        state["open"] = False
        yield sse({"error": ev.error.message})
        return
      piece = text.decode(ev.piece or b"", final=ev.finished)
      if piece:
        yield sse({**head, "text_output": piece})
      if ev.finished:
        state["open"] = False
        return
