"""The KServe v2 HTTP endpoints, with Triton's extensions, over the gRPC servicer.

Every endpoint answers through the servicer that serves gRPC: the metadata, configuration,
statistics and repository endpoints call its methods (a stand-in context turns its aborts into
errors), inference goes through `InferenceServicer.infer` (its routing, the codec's validation,
the runner queue). So one mistake gets the same message on both protocols.

  GET  /v2                                   server metadata
  GET  /v2/health/live | /v2/health/ready    200, or 400 when not (as Triton)
  GET  /v2/models/stats                      statistics of every ready model version
  GET  /v2/models/{m}[/versions/{v}]         model metadata
  GET  .../ready | .../config | .../stats    readiness, configuration, statistics
  POST .../infer                             inference (JSON and binary tensors)
  POST .../generate | .../generate_stream    Triton's generate extension (generate.py)
  POST .../params                            live row updates of the model's params (params.py)
  GET  /v2/models/{m}/shadow                 canary split and shadow comparison (canary.py)
  POST /v2/repository/index                  the repository's models and their states
  POST /v2/repository/models/{m}/load | /unload
  POST /v2/admin/profile, GET /v2/admin/profile/trace   on-demand profiles (admin.py)
  /v1/models, /v1/completions, /v1/chat/completions       the OpenAI API (openai_api.py)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import grpc

from serving.frontend import params, request_trace
from serving.frontend.http import tensors
from serving.frontend.http.admin import AdminRoutes
from serving.frontend.http.app import HTTP_STATUS, HttpError, Reply, Request, json_reply
from serving.frontend.http.generate import Generation
from serving.frontend.http.jsonproto import to_json
from serving.frontend.http.openai_api import OpenAIRoutes
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.servicer import GRPC_CODE, InferenceServicer, log_outcome
from serving.types import SHUTTING_DOWN, Code, ServingError

_CODE_OF = {status: code for code, status in GRPC_CODE.items()}
_MODEL_TAILS = frozenset({"", "ready", "config", "stats", "infer", "generate", "generate_stream",
                          "params", "shadow"})
_POST_TAILS = frozenset({"infer", "generate", "generate_stream", "params"})


class _Context:
  """Stands in for a gRPC servicer context: no deadline, and `abort` raises ServingError with
  the servicer's own code and message."""

  def time_remaining(self) -> None:
    return None

  async def abort(self, code: grpc.StatusCode, details: str) -> None:
    raise ServingError(_CODE_OF.get(code, Code.INTERNAL), details)


class Routes:
  """The endpoints of one server: `lookup(method, path)` finds the handler and its arguments."""

  def __init__(self, servicer: InferenceServicer, is_ready: Callable[[], bool]):
    self.servicer = servicer
    self.is_ready = is_ready  # the server's readiness (models loaded, not shutting down)
    self.generation = Generation(servicer)
    self.admin = AdminRoutes(lambda: servicer.profiler, lambda: servicer.set_trace_rate)
    self.openai = OpenAIRoutes(servicer)
    self._context = _Context()

  @property
  def trace_marker_secret(self) -> str | None:
    """Behind the native HTTP server: its trace marks hold when they carry this secret."""
    return self.generation.trace_marker_secret

  @trace_marker_secret.setter
  def trace_marker_secret(self, secret: str | None) -> None:
    self.generation.trace_marker_secret = self.openai.trace_marker_secret = secret

  def lookup(self, method: str, path: str) -> tuple[Callable, tuple]:
    """(handler, path arguments); HttpError 404 for an unknown path, 405 for a wrong method."""
    parts = path.strip("/").split("/")
    if parts[0] == "v1":
      return self.openai.lookup(method, parts[1:])
    found = self._match(parts)
    if found is None:
      raise HttpError(404, f"no endpoint {path!r}: see the KServe v2 protocol (/v2,"
                      " /v2/health/ready, /v2/models/<model>/infer, ...)")
    want, handler, args = found
    if method != want and not (method == "HEAD" and want == "GET"):
      raise HttpError(405, f"{path} takes {want}, not {method}")
    return handler, args

  def _match(self, parts: list[str]) -> tuple[str, Callable, tuple] | None:
    if parts[0] != "v2":
      return None
    rest = parts[1:]
    if not rest:
      return "GET", self.server_metadata, ()
    if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
      return "GET", self.live if rest[1] == "live" else self.ready, ()
    if rest == ["models", "stats"]:
      return "GET", self.model_stats, ("", "")
    if rest[0] == "models" and len(rest) >= 2:
      return self._match_model(rest[1], rest[2:])
    if rest[0] == "admin":
      return self.admin.match(rest[1:])
    if rest == ["repository", "index"]:
      return "POST", self.repository_index, ()
    if (len(rest) == 4 and rest[:2] == ["repository", "models"]
        and rest[3] in ("load", "unload")):
      return "POST", self.load if rest[3] == "load" else self.unload, (rest[2],)
    return None

  def _match_model(self, model: str, rest: list[str]) -> tuple[str, Callable, tuple] | None:
    version = ""
    if len(rest) >= 2 and rest[0] == "versions":
      version, rest = rest[1], rest[2:]
    if len(rest) > 1 or (rest[0] if rest else "") not in _MODEL_TAILS:
      return None
    tail = rest[0] if rest else ""
    handler = {"": self.model_metadata, "ready": self.model_ready, "config": self.model_config,
               "stats": self.model_stats, "infer": self.infer,
               "generate": self.generation.generate,
               "generate_stream": self.generation.generate_stream,
               "params": self.update_params, "shadow": self.shadow_report}[tail]
    return ("POST" if tail in _POST_TAILS else "GET"), handler, (model, version)

  async def _call(self, method: Callable, request: Any) -> Any:
    return await method(request, self._context)

  # -- health and metadata -----------------------------------------------------------------

  async def live(self, req: Request) -> Reply:
    return Reply(200)

  async def ready(self, req: Request) -> Reply:
    return Reply(200 if self.is_ready() else 400)

  async def server_metadata(self, req: Request) -> Reply:
    resp = await self._call(self.servicer.ServerMetadata, pb.ServerMetadataRequest())
    return json_reply(to_json(resp))

  async def model_metadata(self, req: Request, model: str, version: str) -> Reply:
    resp = await self._call(self.servicer.ModelMetadata,
                            pb.ModelMetadataRequest(name=model, version=version))
    return json_reply(to_json(resp))

  async def model_ready(self, req: Request, model: str, version: str) -> Reply:
    resp = await self._call(self.servicer.ModelReady,
                            pb.ModelReadyRequest(name=model, version=version))
    return Reply(200 if resp.ready else 400)

  async def model_config(self, req: Request, model: str, version: str) -> Reply:
    resp = await self._call(self.servicer.ModelConfig,
                            pb.ModelConfigRequest(name=model, version=version))
    return json_reply(to_json(resp.config, defaults=True))

  async def model_stats(self, req: Request, model: str, version: str) -> Reply:
    resp = await self._call(self.servicer.ModelStatistics,
                            pb.ModelStatisticsRequest(name=model, version=version))
    return json_reply(to_json(resp, defaults=True))

  # -- repository ----------------------------------------------------------------------------

  def _options(self, req: Request) -> dict:
    return tensors.load_json(req.body) if req.body.strip() else {}

  async def repository_index(self, req: Request) -> Reply:
    ready = self._options(req).get("ready", False)
    if not isinstance(ready, bool):
      raise tensors.bad("'ready' must be true or false")
    resp = await self._call(self.servicer.RepositoryIndex, pb.RepositoryIndexRequest(ready=ready))
    return json_reply(to_json(resp).get("models", []))

  async def load(self, req: Request, model: str) -> Reply:
    request = pb.RepositoryModelLoadRequest(model_name=model)
    for key, value in tensors.parameters_of(self._options(req), "the load request").items():
      request.parameters[key].string_param = str(value)  # the servicer refuses any, by name
    await self._call(self.servicer.RepositoryModelLoad, request)
    return Reply(200)

  async def unload(self, req: Request, model: str) -> Reply:
    self._options(req)  # a malformed body is still an error
    await self._call(self.servicer.RepositoryModelUnload,
                     pb.RepositoryModelUnloadRequest(model_name=model))
    return Reply(200)

  # -- inference -----------------------------------------------------------------------------

  async def infer(self, req: Request, model: str, version: str) -> Reply:
    """POST .../infer: JSON or binary tensors in, as the request asks out."""
    t0 = time.perf_counter()
    servicer = self.servicer
    if servicer.refusing():
      raise ServingError(Code.UNAVAILABLE, SHUTTING_DOWN)
    request_id = ""
    rt = None if servicer.tracing is None else request_trace.start_http(
        servicer.tracing, req.headers, req.path, t0, self.trace_marker_secret)
    try:
      n = tensors.header_length(req.headers.get(tensors.HEADER_LENGTH), len(req.body))
      request = tensors.parse_infer_request(model, version, req.body, n)
      request_id = servicer.request_id(request.id)
      rec, outputs, specs, generations = await servicer.infer(request, None, t0, request_id,
                                                              trace=rt)
    except ServingError as e:
      log_outcome(model, version, request_id, e, t0)
      if rt is not None:
        request_trace.finish_http(servicer.tracing, rt, request_id, HTTP_STATUS[e.code], e)
      raise
    log_outcome(model, version, request_id, None, t0)
    body, n = tensors.encode_infer_response(request, rec.version, outputs, specs, generations)
    if rt is not None:
      request_trace.finish_http(servicer.tracing, rt, request_id, 200, None)
    if n is None:
      return Reply(200, body)
    return Reply(200, body, tensors.BINARY_TYPE, [(tensors.HEADER_LENGTH, str(n).encode())])

  async def update_params(self, req: Request, model: str, version: str) -> Reply:
    """POST .../params: rows of the model's param leaves set while it serves (JSON or binary
    tensors, as for infer, or an .npz update file); answers the params generation."""
    servicer = self.servicer
    rec, runner = servicer.route(model, version)
    kind = req.headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if kind == params.NPZ_TYPE.encode():
      changes = params.decode_npz(req.body, rec.manifest, servicer.limits)
      rows, generation = await asyncio.to_thread(
          params.apply_changes, runner, rec.manifest, changes, servicer.repo.compiles)
      return json_reply({"model_name": rec.name, "model_version": str(rec.version),
                         "rows": rows, "generation": generation})
    n = tensors.header_length(req.headers.get(tensors.HEADER_LENGTH), len(req.body))
    request = tensors.parse_infer_request(model, version, req.body, n)
    rows, generation = await asyncio.to_thread(
        params.apply_update, runner, rec.manifest, request, servicer.limits,
        servicer.repo.compiles)
    return json_reply({"model_name": rec.name, "model_version": str(rec.version),
                       "rows": rows, "generation": generation})

  async def shadow_report(self, req: Request, model: str, version: str) -> Reply:
    """GET /v2/models/<m>/shadow: the model's traffic split and shadow comparison as JSON."""
    if version:
      raise HttpError(404, "the shadow report is per model: GET /v2/models/<model>/shadow")
    return json_reply(self.servicer.canary.report(model))
