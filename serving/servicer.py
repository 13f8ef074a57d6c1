"""gRPC servicer for Triton's `inference.GRPCInferenceService`: protocol in, our requests out.

It parses and validates, hands an InferRequest to the model's runner, and awaits
the answer; it decides nothing about batching. Runner completions arrive in one
`call_soon_threadsafe` per batch (see `AsyncDelivery`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Any

import grpc
import numpy as np

from serving import codec
from serving.protocol import grpc_service_pb2 as pb
from serving.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.protocol import model_config_pb2 as mc
from serving.repository import ModelRepository, ServedVersion, State
from serving.types import Code, InferRequest, ServingError

logger = logging.getLogger(__name__)

SERVER_NAME = "xlaserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy",
              "parameters")

GRPC_CODE = {c: getattr(grpc.StatusCode, c.value) for c in Code}

_MC_TYPE = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32, "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32, "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64, "BF16": mc.TYPE_BF16,
    "BYTES": mc.TYPE_STRING,
}


def log_outcome(model: str, version: str, request_id: str, err: ServingError | None,
                t0: float) -> None:
  """One structured record per request: ERROR for server faults, DEBUG otherwise."""
  level = logging.DEBUG if err is None or err.code is not Code.INTERNAL else logging.ERROR
  if logger.isEnabledFor(level):
    logger.log(level, "infer %s", "ok" if err is None else err.code.value, extra={
        "request_id": request_id, "model": model, "version": version,
        "code": "OK" if err is None else err.code.value,
        "latency_ms": round((time.perf_counter() - t0) * 1e3, 3),
        **({} if err is None else {"error": err.message})})


class AsyncDelivery:
  """Runner -> asyncio: resolves each request's future on the event loop, one hop per batch."""

  def __init__(self) -> None:
    self.loop: asyncio.AbstractEventLoop | None = None

  def __call__(self, completions: list) -> None:
    loop = self.loop
    if loop is None or loop.is_closed():
      return
    loop.call_soon_threadsafe(_resolve_all, completions)


def _resolve_all(completions: list) -> None:
  for req, out, err in completions:
    fut = req.extra
    if fut is not None and not fut.done():
      if err is None:
        fut.set_result(out)
      else:
        fut.set_exception(err)


def _parse_version(v: str) -> int | None:
  if not v:
    return None
  try:
    n = int(v)
  except ValueError:
    raise ServingError(Code.INVALID_ARGUMENT, f"model version {v!r} is not an integer") from None
  if n < 1:
    raise ServingError(Code.INVALID_ARGUMENT, f"model version {v!r} must be >= 1")
  return n


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
  """Triton v2 protocol over a ModelRepository."""

  def __init__(self, repository: ModelRepository, *, limits: codec.Limits = codec.Limits(),
               on_admit_error=None):
    self.repo = repository
    self.limits = limits
    self.accepting = True
    self.on_repository_change = None  # called after RepositoryModelLoad/Unload (health refresh)
    self._id_prefix = secrets.token_hex(4)  # request ids for requests that bring none
    self._ids = itertools.count(1)
    self._inflight = 0
    self._idle = asyncio.Event()
    self._idle.set()

  # -- helpers -----------------------------------------------------------------

  async def _abort(self, context: grpc.aio.ServicerContext, err: ServingError) -> None:
    await context.abort(GRPC_CODE[err.code], err.message)

  def _get(self, name: str, version: str) -> ServedVersion:
    if not name:
      raise ServingError(Code.INVALID_ARGUMENT, "model_name is empty")
    if not version:
      rec = self.repo.default_version(name)  # lock-free fast path
      if rec is not None:
        return rec
    self.repo.check_name(name)  # rejects path-like names before any lookup
    return self.repo.get(name, _parse_version(version))

  def _serving(self, name: str, version: str) -> tuple[ServedVersion, Any]:
    """The version to use and its runner, read once: a hot reload may retire the version
    between lookup and use; an unnamed version then resolves to the new default."""
    for _ in range(3):
      rec = self._get(name, version)
      runner = rec.runner
      if runner is not None:
        return rec, runner
      if version:
        break
    raise ServingError(Code.UNAVAILABLE, f"model {name!r} version {version or 'default'} was"
                       " unloaded while this request was routed; retry")

  def _log_outcome(self, request, request_id: str, err: ServingError | None, t0: float) -> None:
    log_outcome(request.model_name, request.model_version, request_id, err, t0)

  # -- health and metadata -----------------------------------------------------

  async def ServerLive(self, request, context):
    return pb.ServerLiveResponse(live=True)

  async def ServerReady(self, request, context):
    return pb.ServerReadyResponse(ready=self.accepting and self.repo.all_ready)

  async def ModelReady(self, request, context):
    try:
      self._get(request.name, request.version)
      return pb.ModelReadyResponse(ready=self.accepting)
    except ServingError:
      return pb.ModelReadyResponse(ready=False)

  async def ServerMetadata(self, request, context):
    return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION,
                                     extensions=list(EXTENSIONS))

  async def ModelMetadata(self, request, context):
    try:
      rec, runner = self._serving(request.name, request.version)
    except ServingError as e:
      return await self._abort(context, e)
    sig = runner.engine
    return pb.ModelMetadataResponse(
        name=rec.name,
        versions=[str(r.version) for r in self.repo.versions_of(rec.name)
                  if r.state is State.READY],
        platform="xlaserve_jax",
        inputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                        shape=list(t.shape)) for t in sig.inputs],
        outputs=[pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype,
                                                         shape=list(t.shape)) for t in sig.outputs])

  async def ModelConfig(self, request, context):
    try:
      rec = self._get(request.name, request.version)
      return pb.ModelConfigResponse(config=self.model_config(rec))
    except ServingError as e:
      return await self._abort(context, e)

  def model_config(self, rec: ServedVersion) -> mc.ModelConfig:
    """Triton's ModelConfig: batch dims are implicit (dims exclude the leading -1)."""
    runner = rec.runner
    if runner is None:
      raise ServingError(Code.UNAVAILABLE, f"model {rec.name!r} version {rec.version} was"
                         " unloaded; retry")
    engine = runner.engine
    batching = runner.config
    cfg = mc.ModelConfig(
        name=rec.name, platform="xlaserve_jax", backend="xlaserve",
        max_batch_size=self.limits.max_rows,
        input=[mc.ModelInput(name=t.name, data_type=_MC_TYPE[t.datatype], dims=list(t.shape[1:]))
               for t in engine.inputs],
        output=[mc.ModelOutput(name=t.name, data_type=_MC_TYPE[t.datatype],
                               dims=list(t.shape[1:])) for t in engine.outputs],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=list(batching.buckets),
            max_queue_delay_microseconds=int(batching.max_queue_delay_s * 1e6)),
    )
    cfg.version_policy.latest.num_versions = rec.config.latest_n
    cfg.instance_group.add(count=getattr(runner, "instances", 1),
                           kind=mc.ModelInstanceGroup.KIND_AUTO)
    if getattr(runner, "decoupled", False):  # several responses per request (streaming)
      cfg.model_transaction_policy.decoupled = True
    return cfg

  async def ModelStatistics(self, request, context):
    resp = pb.ModelStatisticsResponse()
    try:
      if request.name:
        recs = [self._get(request.name, request.version)]
      else:
        recs = [r for r in self.repo.records() if r.state is State.READY]
    except ServingError as e:
      return await self._abort(context, e)
    for rec in recs:
      runner = rec.runner
      if runner is None:  # unloaded since it was listed
        continue
      st = runner.stats
      ms = resp.model_stats.add(name=rec.name, version=str(rec.version),
                                last_inference=st.last_inference_ms,
                                inference_count=st.inference_count,
                                execution_count=st.execution_count)
      s = ms.inference_stats
      s.success.count, s.success.ns = st.success_count, st.success_ns
      s.fail.count, s.fail.ns = st.fail_count, st.fail_ns
      s.queue.count, s.queue.ns = st.success_count, st.queue_ns
      s.compute_input.count, s.compute_input.ns = st.execution_count, st.compute_input_ns
      s.compute_infer.count, s.compute_infer.ns = st.execution_count, st.compute_infer_ns
      s.compute_output.count, s.compute_output.ns = st.execution_count, st.compute_output_ns
      for bucket, n in sorted(st.batch_counts.items()):
        b = ms.batch_stats.add(batch_size=bucket)
        b.compute_infer.count = n
    return resp

  async def RepositoryIndex(self, request, context):
    resp = pb.RepositoryIndexResponse()
    for rec in self.repo.records():
      if request.ready and rec.state is not State.READY:
        continue
      resp.models.add(name=rec.name, version=str(rec.version) if rec.version else "",
                      state=rec.state.value, reason=rec.reason)
    return resp

  async def RepositoryModelLoad(self, request, context):
    try:
      self.repo.model_dir(request.model_name)
      if request.parameters:
        raise ServingError(Code.INVALID_ARGUMENT, "RepositoryModelLoad parameters (config"
                           " overrides, file uploads) are not supported: put the bundle and"
                           " config.json in the repository, then load the model by name")
      loop = asyncio.get_running_loop()
      recs = await loop.run_in_executor(None, self.repo.load, request.model_name)
    except ServingError as e:
      return await self._abort(context, e)
    finally:
      if self.on_repository_change is not None:
        self.on_repository_change()
    bad = [r for r in recs if r.state is not State.READY]
    if bad:
      await context.abort(grpc.StatusCode.INTERNAL,
                          f"failed to load {request.model_name}: {bad[0].reason}")
    return pb.RepositoryModelLoadResponse()

  async def RepositoryModelUnload(self, request, context):
    try:
      self.repo.check_name(request.model_name)
      loop = asyncio.get_running_loop()
      await loop.run_in_executor(None, self.repo.unload, request.model_name)
    except ServingError as e:
      return await self._abort(context, e)
    finally:
      if self.on_repository_change is not None:
        self.on_repository_change()
    return pb.RepositoryModelUnloadResponse()

  # -- inference ---------------------------------------------------------------

  async def ModelInfer(self, request, context):
    t0 = time.perf_counter()
    if not self.accepting:
      await context.abort(grpc.StatusCode.UNAVAILABLE,
                          "server is shutting down; retry on another replica")
    request_id = request.id or f"{self._id_prefix}-{next(self._ids)}"
    try:
      response = await self._predict(request, context, t0, request_id)
    except ServingError as e:
      self._log_outcome(request, request_id, e, t0)
      return await self._abort(context, e)
    self._log_outcome(request, request_id, None, t0)
    return response

  async def _predict(self, request, context, t0: float,
                     request_id: str) -> pb.ModelInferResponse:
    """Validates, queues and awaits one request (ModelInfer, and predict models in a stream);
    raises ServingError. In-flight requests are counted for graceful shutdown."""
    for attempt in range(3):
      rec, runner = self._serving(request.model_name, request.model_version)
      engine = runner.engine
      arrays, rows = codec.decode_inputs(request, engine.inputs, self.limits)
      out_specs = codec.requested_outputs(request, engine.outputs)
      deadline, priority = self._schedule_params(request, context, t0,
                                                 rec.config.default_timeout_us)
      fut = asyncio.get_running_loop().create_future()
      req = InferRequest(inputs=arrays, rows=rows, on_done=_unused, arrival=t0,
                         deadline=deadline, priority=priority, request_id=request_id,
                         extra=fut)
      if getattr(runner, "wants_parameters", False):
        req.parameters = {k: codec.param_value(v) for k, v in request.parameters.items()}
      try:
        runner.submit(req)
        break
      except ServingError as e:  # retired by a hot reload after lookup: use the new default
        if (e.code is not Code.UNAVAILABLE or request.model_version or attempt == 2
            or rec.state is State.READY):
          raise
    self._inflight += 1
    self._idle.clear()
    try:
      outputs = await fut
    finally:
      self._inflight -= 1
      if self._inflight == 0:
        self._idle.set()
    return codec.encode_response(request, rec.version, outputs, out_specs)

  async def ModelStreamInfer(self, request_iterator, context):
    """Bidirectional stream: generate models stream a response per piece of text (the last
    marked `triton_final_response`); predict models answer each request once. Errors go
    back as `error_message` on the stream, which stays open; a client that cancels or
    disconnects cancels its generations at once (slots and KV pages freed)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    live: dict[int, Any] = {}  # stream-local key -> generation handle
    open_items = [0]
    reader_done = asyncio.Event()

    def error_response(request, err: ServingError) -> pb.ModelStreamInferResponse:
      return pb.ModelStreamInferResponse(
          error_message=f"{err.code.value}: {err.message}",
          infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))

    async def predict(request) -> None:
      try:
        resp = await self._predict(request, context, time.perf_counter(), request.id)
        resp.parameters["triton_final_response"].bool_param = True
        out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))
      except ServingError as e:
        out.put_nowait(error_response(request, e))
      finally:
        open_items[0] -= 1
        out.put_nowait(None)

    def start_generation(request, rec, runner, key: int) -> None:
      arrays, _ = codec.decode_inputs(request, runner.engine.inputs, self.limits)
      prompts = arrays["text_input"].reshape(-1)
      if len(prompts) != 1:
        raise ServingError(Code.INVALID_ARGUMENT, "stream one prompt per request (text_input"
                           f" has {len(prompts)} elements)")
      params = {k: codec.param_value(v) for k, v in request.parameters.items()}
      empty_final = bool(params.pop("triton_enable_empty_final_response", False))
      params.pop("streaming", None)

      def on_event(ev) -> None:  # engine thread
        loop.call_soon_threadsafe(on_event_loop, ev)

      def on_event_loop(ev) -> None:
        def respond(piece: bytes | None, final: bool) -> None:
          resp = pb.ModelInferResponse(model_name=rec.name, model_version=str(rec.version),
                                       id=request.id)
          if piece is not None:
            resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
            resp.raw_output_contents.append(codec.encode_bytes_tensor(
                np.array([piece], dtype=object)))
          resp.parameters["triton_final_response"].bool_param = final
          out.put_nowait(pb.ModelStreamInferResponse(infer_response=resp))

        if ev.error is not None:
          out.put_nowait(error_response(request, ev.error))
        elif not ev.finished:
          if ev.piece:
            respond(ev.piece, False)
        elif empty_final:  # data first, then an empty response carrying only the flag
          if ev.piece:
            respond(ev.piece, False)
          respond(None, True)
        else:
          respond(ev.piece if ev.piece else None, True)
        if ev.finished:
          live.pop(key, None)
          open_items[0] -= 1
          out.put_nowait(None)

      live[key] = runner.stream(bytes(prompts[0]) if isinstance(prompts[0], bytes)
                                else str(prompts[0]).encode(), params, request.id, on_event)

    async def reader() -> None:
      key = 0
      try:
        async for request in request_iterator:
          key += 1
          if not self.accepting:
            out.put_nowait(error_response(request, ServingError(
                Code.UNAVAILABLE, "server is shutting down; retry on another replica")))
            continue
          try:
            rec, runner = self._serving(request.model_name, request.model_version)
            open_items[0] += 1
            if getattr(runner, "decoupled", False):
              try:
                start_generation(request, rec, runner, key)
              except ServingError:
                open_items[0] -= 1
                raise
            else:
              asyncio.ensure_future(predict(request))
          except ServingError as e:
            out.put_nowait(error_response(request, e))
      finally:
        reader_done.set()
        out.put_nowait(None)

    reader_task = asyncio.ensure_future(reader())
    try:
      while True:
        item = await out.get()
        if item is not None:
          yield item
        elif reader_done.is_set() and open_items[0] == 0 and out.empty():
          break
    finally:
      reader_task.cancel()
      for handle in list(live.values()):
        handle.cancel()  # client went away or the stream ended: free slots and pages now

  def _schedule_params(self, request, context, t0: float,
                       default_timeout_us: int | None = None) -> tuple[float | None, int]:
    deadline = None
    remaining = context.time_remaining()
    if remaining is not None:
      deadline = t0 + remaining
    if default_timeout_us and "timeout" not in request.parameters:
      d = t0 + default_timeout_us / 1e6
      deadline = d if deadline is None else min(deadline, d)
    priority = 0
    for key, p in request.parameters.items():
      value = codec.param_value(p)
      if key == "timeout":  # Triton: microseconds
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
          raise ServingError(Code.INVALID_ARGUMENT, "parameter 'timeout' must be a non-negative"
                             " integer (microseconds)")
        if value:
          d = t0 + value / 1e6
          deadline = d if deadline is None else min(deadline, d)
      elif key == "priority":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
          raise ServingError(Code.INVALID_ARGUMENT, "parameter 'priority' must be a non-negative"
                             " integer (1 is highest; 0 means default)")
        priority = value if value else 1 << 30
    if priority == 0:
      priority = 1 << 30
    return deadline, priority

  async def wait_idle(self, timeout: float) -> bool:
    """Waits until no request is in flight (graceful shutdown)."""
    try:
      await asyncio.wait_for(self._idle.wait(), timeout)
      return True
    except asyncio.TimeoutError:
      return False


def _unused(outputs: Any, error: Any) -> None:
  """Completions reach the servicer through AsyncDelivery, not this callback."""
