"""gRPC servicer for Triton's `inference.GRPCInferenceService`: protocol in, our requests out.

It parses and validates, hands an InferRequest to the model's runner, and awaits
the answer; it decides nothing about batching. Runner completions arrive in one
`call_soon_threadsafe` per batch (see `AsyncSink`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import Mapping

import grpc
import numpy as np

from bundle import TensorSpec
from serving.frontend import codec, params, refusals, request_trace
from serving.frontend.canary import Canary, shadow_marked
from serving.frontend.memory_usage import add_memory_usage
from serving.frontend.model_config import model_config, model_metadata
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.protocol import grpc_service_pb2_grpc as pb_grpc
from serving.frontend.stream import StreamSession
from serving.repository import ModelRepository, ServedVersion, State
from serving.runners import Runner
from serving.telemetry.logs import log_outcome
from serving.telemetry.profile import model_key
from serving.telemetry.tracing import RequestTrace
from serving.types import SHUTTING_DOWN, Code, Completion, InferRequest, ServingError

logger = logging.getLogger(__name__)

SERVER_NAME = "xlaserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "schedule_policy",
              "parameters")

GRPC_CODE = {c: getattr(grpc.StatusCode, c.value) for c in Code}


class AsyncSink:
  """Runner -> asyncio: resolves each request's future (its `sink_token`) on the event loop, one
  hop per batch."""

  def __init__(self) -> None:
    self.loop: asyncio.AbstractEventLoop | None = None

  def complete(self, completions: list[Completion]) -> None:
    loop = self.loop
    if loop is None or loop.is_closed():
      return
    loop.call_soon_threadsafe(_resolve_all, completions)


def _resolve_all(completions: list[Completion]) -> None:
  for req, out, err in completions:
    fut = req.sink_token
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

  def __init__(self, repository: ModelRepository, *, limits: codec.Limits = codec.Limits()):
    self.repo = repository
    self.limits = limits
    self.accepting = True
    self.refused = 0  # requests refused because the server is shutting down (the drain's clock)
    self.on_repository_change = None  # called after RepositoryModelLoad/Unload (health refresh)
    self.profiler = None  # the server's Profiler (serving/telemetry/profile.py): admin endpoint
    self.stages = None  # while a profile runs, `.recorder` takes front-end times (Metrics)
    self.set_trace_rate = None  # with tracing on: changes its sampling rate (admin endpoint)
    self.sink = AsyncSink()  # answers of requests this servicer accepted
    self.canary = Canary(repository)  # traffic splits and shadow versions
    self.id_prefix = secrets.token_hex(4)  # request ids for requests that bring none
    self._ids = itertools.count(1)
    self._inflight = 0
    self._idle = asyncio.Event()
    self._idle.set()
    self.tracing = None  # a Tracing (serving/telemetry/tracing.py) when requests are traced
    # Behind the native front end: its marks hold (tracing's head decision, the split's shadow
    # draw); a client cannot set them through it.
    self.trust_trace_marker = False
    self.tenant_gate = None  # --tenants (serving/frontend/tenant_gate.py): quotas and priority

  # -- helpers -----------------------------------------------------------------

  async def _abort(self, context: grpc.aio.ServicerContext, err: ServingError) -> None:
    await refusals.hold(getattr(err, "hold_s", 0.0), context.time_remaining())  # over a quota
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

  def route(self, name: str, version: str) -> tuple[ServedVersion, Runner]:
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
      rec, runner = self.route(request.name, request.version)
    except ServingError as e:
      return await self._abort(context, e)
    versions = [str(r.version) for r in self.repo.versions_of(rec.name) if r.state is State.READY]
    return model_metadata(rec, runner, versions)

  async def ModelConfig(self, request, context):
    try:
      rec = self._get(request.name, request.version)
      return pb.ModelConfigResponse(config=model_config(rec, self.limits.max_rows))
    except ServingError as e:
      return await self._abort(context, e)

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
      add_memory_usage(ms, runner)
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
    if params.UPDATE_PARAMETER in request.parameters:  # a live update, not a (re)load
      return await self._update_params(request, context)
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
    if bad:  # e.g. RESOURCE_EXHAUSTED: over the device memory budget
      await context.abort(GRPC_CODE[bad[0].code],
                          f"failed to load {request.model_name}: {bad[0].reason}")
    return pb.RepositoryModelLoadResponse()

  async def _update_params(self, request, context):
    """RepositoryModelLoad with `params_update` (bytes: an .npz update file, see params.py, and
    optionally `version`): applies it to the served version between two batches; the params
    generation comes back as trailing metadata `params-generation`."""
    try:
      extra = sorted(set(request.parameters) - {params.UPDATE_PARAMETER, "version"})
      if extra:
        raise ServingError(Code.INVALID_ARGUMENT, f"parameters {extra} do not go with"
                           f" {params.UPDATE_PARAMETER!r}")
      p = request.parameters
      rec, runner = self.route(request.model_name,
                               p["version"].string_param if "version" in p else "")
      changes = params.decode_npz(p[params.UPDATE_PARAMETER].bytes_param, rec.manifest,
                                  self.limits)
      _, generation = await asyncio.get_running_loop().run_in_executor(
          None, params.apply_changes, runner, rec.manifest, changes, self.repo.compiles)
    except ServingError as e:
      return await self._abort(context, e)
    context.set_trailing_metadata((("params-generation", str(generation)),))
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

  def refusing(self) -> bool:
    """True once shutting down (the caller refuses with UNAVAILABLE); counts the refusal, so the
    drain can wait for a spell without requests before it closes the ports."""
    if self.accepting:
      return False
    self.refused += 1
    return True

  async def ModelInfer(self, request, context):
    t0 = time.perf_counter()
    if self.refusing():
      await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
    request_id = self.request_id(request.id)
    rt = None if self.tracing is None else request_trace.start_grpc(
        self.tracing, context, request.model_name, t0, self.trust_trace_marker)
    try:
      response = await self.predict(request, context, t0, request_id, trace=rt)
    except ServingError as e:
      self._log_outcome(request, request_id, e, t0)
      if rt is not None:
        request_trace.finish_grpc(self.tracing, rt, request_id, e)
      return await self._abort(context, e)
    self._log_outcome(request, request_id, None, t0)
    if rt is not None:
      request_trace.finish_grpc(self.tracing, rt, request_id, None)
    return response

  def request_id(self, given: str) -> str:
    """The client's request id, or a fresh server-unique one when it sent none."""
    return given or f"{self.id_prefix}-{next(self._ids)}"

  async def predict(self, request, context, t0: float, request_id: str, *,
                    trace: RequestTrace | None = None) -> pb.ModelInferResponse:
    """Validates, queues and awaits one request (ModelInfer, and predict models in a stream);
    raises ServingError."""
    rec, outputs, out_specs, generations = await self.infer(request, context, t0, request_id,
                                                            trace=trace)
    return codec.encode_response(request, rec.version, outputs, out_specs, generations)

  async def infer(self, request, context, t0: float, request_id: str, *,
                  trace: RequestTrace | None = None
                  ) -> tuple[ServedVersion, Mapping[str, np.ndarray], list[TensorSpec],
                             tuple[int, int]]:
    """The protocol-neutral half of `predict`: routes, validates, queues and awaits one request
    given as a ModelInferRequest or an object with its attributes (the HTTP front end's), with
    `context` None when the protocol has no deadline of its own. Returns (version, outputs,
    requested output specs, params generations that scored it); raises ServingError. In-flight requests are counted for graceful
    shutdown."""
    for attempt in range(3):
      rec, runner = (self.canary.route(request)
                     or self.route(request.model_name, request.model_version))
      arrays, rows = codec.decode_inputs(request, runner.inputs, self.limits)
      out_specs = codec.requested_outputs(request, runner.outputs)
      deadline, priority = self._schedule_params(request, context, t0,
                                                 rec.config.default_timeout_us)
      if self.tenant_gate is not None:  # charged once its rows are known; raises OverQuota
        priority = self.tenant_gate.admit(rows, priority)
      fut = asyncio.get_running_loop().create_future()
      req = InferRequest(inputs=arrays, rows=rows, sink=self.sink, arrival=t0,
                         deadline=deadline, priority=priority, request_id=request_id,
                         sink_token=fut)
      if runner.capabilities.wants_parameters:
        req.parameters = {k: codec.param_value(v) for k, v in request.parameters.items()}
      if trace is not None:  # sampled (`trace` says so): the runner records its batch span
        trace.submitted(rec.name, rec.version, rows)
        req.trace = trace
      try:
        runner.submit(req)
        if self.stages is not None and (recorder := self.stages.recorder) is not None:
          recorder.add(model_key(rec.name, rec.version), "front_end", [time.perf_counter() - t0])
        break
      except ServingError as e:  # retired by a hot reload after lookup: use the new default
        rebuilt = rec.runner is not runner  # this version's runner replaced (an adopted plan)
        if (e.code is not Code.UNAVAILABLE or attempt == 2 or not rebuilt
            and (request.model_version or rec.state is State.READY)):
          raise
    self._inflight += 1
    self._idle.clear()
    try:
      outputs = await fut
    finally:
      if trace is not None:
        trace.answered()
      self._inflight -= 1
      if self._inflight == 0:
        self._idle.set()
    self.canary.answered(request, rec, runner, arrays, rows, outputs, request_id, sampled=(
        self.trust_trace_marker and context is not None and shadow_marked(context)))
    return rec, outputs, out_specs, req.generations

  async def ModelStreamInfer(self, request_iterator, context):
    """Bidirectional stream: see serving/frontend/stream.py."""
    session = StreamSession(self, context)
    async for response in session.run(request_iterator):  # cancellation reaches run's cleanup
      yield response

  def _schedule_params(self, request, context, t0: float,
                       default_timeout_us: int | None = None) -> tuple[float | None, int]:
    deadline = None
    remaining = None if context is None else context.time_remaining()
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

