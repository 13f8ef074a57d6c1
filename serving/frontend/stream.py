"""ModelStreamInfer: one bidirectional stream, many requests in flight on it.

Generate models (decoupled runners) stream a response per piece of text, the last marked
`triton_final_response`; predict models answer each request once. Errors go back as
`error_message` on the stream, which stays open; a client that cancels or disconnects cancels
its generations at once (slots and KV pages freed). A request over its tenant's quota is
answered when the quota would admit it again, as a unary call is (serving/frontend/refusals.py),
without holding up the stream's other requests.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import numpy as np

from serving.frontend import codec, refusals, request_trace
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.types import SHUTTING_DOWN, Code, ServingError


def error_response(request: Any, err: ServingError) -> pb.ModelStreamInferResponse:
  """The in-stream answer to a failed request: the stream itself stays open."""
  return pb.ModelStreamInferResponse(
      error_message=f"{err.code.value}: {err.message}",
      infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))


class StreamSession:
  """The state of one stream: its outgoing queue, the generations it has running, and how many
  requests still owe answers. `run` yields responses until the client is done and every
  request is answered."""

  def __init__(self, servicer: Any, context: Any):
    self.servicer = servicer  # InferenceServicer: routing, validation, predict path
    self.context = context
    self.loop = asyncio.get_running_loop()
    self.out: asyncio.Queue = asyncio.Queue()
    self.live: dict[int, Any] = {}  # stream-local key -> generation handle
    self.traces: dict[int, Any] = {}  # stream-local key -> a sampled generation's trace
    self.open_items = 0
    self.reader_done = asyncio.Event()

  async def run(self, request_iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
    reader_task = asyncio.ensure_future(self._read(request_iterator))
    try:
      while True:
        item = await self.out.get()
        if item is not None:
          yield item
        elif self.reader_done.is_set() and self.open_items == 0 and self.out.empty():
          break
    finally:
      reader_task.cancel()
      for handle in list(self.live.values()):
        handle.cancel()  # client went away or the stream ended: free slots and pages now

  async def _read(self, request_iterator: AsyncIterator[Any]) -> None:
    key = 0
    try:
      async for request in request_iterator:
        key += 1
        if self.servicer.refusing():
          self.out.put_nowait(error_response(request, ServingError(Code.UNAVAILABLE, SHUTTING_DOWN)))
          continue
        try:
          self._start(request, key)
        except ServingError as e:
          if getattr(e, "hold_s", 0.0) > 0:  # over a quota: answered when it would admit it
            self.open_items += 1
            asyncio.ensure_future(self._refuse(request, e))
          else:
            self.out.put_nowait(error_response(request, e))
    finally:
      self.reader_done.set()
      self.out.put_nowait(None)

  def _start(self, request: Any, key: int) -> None:
    rec, runner = self.servicer.route(request.model_name, request.model_version)
    self.open_items += 1
    if not runner.capabilities.decoupled:
      asyncio.ensure_future(self._predict(request))
      return
    try:
      self._generate(request, rec, runner, key)
    except ServingError:
      self.open_items -= 1
      raise

  def _trace(self, request: Any, t0: float) -> Any:
    """The request's trace when tracing samples it (the stream's metadata decides), else None."""
    s = self.servicer
    return None if s.tracing is None else request_trace.start_grpc(
        s.tracing, self.context, request.model_name, t0, s.trust_trace_marker,
        "ModelStreamInfer")

  async def _predict(self, request: Any) -> None:
    t0 = time.perf_counter()
    rt, tracing, request_id = self._trace(request, t0), self.servicer.tracing, request.id
    try:
      resp = await self.servicer.predict(request, self.context, t0, request_id, trace=rt)
      resp.parameters["triton_final_response"].bool_param = True
      self.out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
      if rt is not None:
        request_trace.finish_grpc(tracing, rt, request_id, None)
    except ServingError as e:
      await self._answer_error(request, e)
      if rt is not None:
        request_trace.finish_grpc(tracing, rt, request_id, e)
    finally:
      self.open_items -= 1
      self.out.put_nowait(None)

  async def _answer_error(self, request: Any, err: ServingError) -> None:
    """An in-stream error; one over a quota is held until the quota would admit the request
    again, as a unary call's refusal is."""
    await refusals.hold(getattr(err, "hold_s", 0.0), self.context.time_remaining())
    self.out.put_nowait(error_response(request, err))

  async def _refuse(self, request: Any, err: ServingError) -> None:
    """The reader's over-quota refusal, answered apart from it (one open item meanwhile)."""
    try:
      await self._answer_error(request, err)
    finally:
      self.open_items -= 1
      self.out.put_nowait(None)

  def _generate(self, request: Any, rec: Any, runner: Any, key: int) -> None:
    arrays, _ = codec.decode_inputs(request, runner.inputs, self.servicer.limits)
    prompts = arrays["text_input"].reshape(-1)
    if len(prompts) != 1:
      raise ServingError(Code.INVALID_ARGUMENT, "stream one prompt per request (text_input"
                         f" has {len(prompts)} elements)")
    if (gate := self.servicer.tenant_gate) is not None:  # --tenants: a prompt is 1 row
      gate.admit(1, 0)
    params = {k: codec.param_value(v) for k, v in request.parameters.items()}
    empty_final = bool(params.pop("triton_enable_empty_final_response", False))
    params.pop("streaming", None)
    loop = self.loop

    def on_event(ev: Any) -> None:  # engine thread
      loop.call_soon_threadsafe(self._on_event, request, rec, key, empty_final, ev)

    prompt = prompts[0] if isinstance(prompts[0], bytes) else str(prompts[0]).encode()
    rt = self._trace(request, time.perf_counter())
    if rt is not None:
      rt.submitted(rec.name, rec.version, 1)
      self.traces[key] = rt
    self.live[key] = runner.stream(bytes(prompt), params, request.id, on_event)

  def _respond(self, request: Any, rec: Any, piece: bytes | None, final: bool) -> None:
    resp = pb.ModelInferResponse(model_name=rec.name, model_version=str(rec.version),
                                 id=request.id)
    if piece is not None:
      resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
      resp.raw_output_contents.append(codec.encode_bytes_tensor(np.array([piece], dtype=object)))
    resp.parameters["triton_final_response"].bool_param = final
    self.out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))

  def _on_event(self, request: Any, rec: Any, key: int, empty_final: bool, ev: Any) -> None:
    """Event loop: one generation event -> zero, one or two responses."""
    if ev.error is not None:
      self.out.put_nowait(error_response(request, ev.error))
    elif not ev.finished:
      if ev.piece:
        self._respond(request, rec, ev.piece, False)
    elif empty_final:  # data first, then an empty response carrying only the flag
      if ev.piece:
        self._respond(request, rec, ev.piece, False)
      self._respond(request, rec, None, True)
    else:
      self._respond(request, rec, ev.piece if ev.piece else None, True)
    if ev.finished:
      self.live.pop(key, None)
      if (rt := self.traces.pop(key, None)) is not None:
        request_trace.finish_generation(self.servicer.tracing, rt, request.id, ev)
      self.open_items -= 1
      self.out.put_nowait(None)
