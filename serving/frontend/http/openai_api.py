"""An OpenAI-compatible API over the generate models, beside the KServe v2 endpoints.

  GET  /v1/models                 every ready generate model (OpenAI's list object)
  GET  /v1/models/{model}         one of them
  POST /v1/completions            prompt (string or list), n, stream, logprobs (int), ...
  POST /v1/chat/completions       messages (rendered by openai_schema.render_chat), ...

Requests are parsed by openai_schema.py and run by openai_run.py on the model's
GenerationRunner (the same service, statistics and metrics as Triton's generate and gRPC
streaming). Every error, a bad field or an unknown path under /v1 included, is answered in
OpenAI's format with its status (400, 404, 429 for a full queue, 503 when shutting down). A
client that disconnects, streaming or not, cancels its generations at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from serving.frontend import request_trace
from serving.frontend.http.app import Reply, Request, StreamReply, json_reply
from serving.frontend.http.openai_run import Run, model_object
from serving.frontend.http.openai_schema import (ApiError, load_body, parse_chat,
                                                 parse_completion)
from serving.frontend.servicer import InferenceServicer
from serving.generation.runner import GenerationRunner
from serving.repository import State
from serving.types import SHUTTING_DOWN, Code, ServingError

logger = logging.getLogger(__name__)


def error_reply(e: ApiError) -> Reply:
  return json_reply(e.body(), e.status)


async def _disconnected(req: Request) -> None:
  """Returns once the client has gone (never, when the server gives no way to tell)."""
  if req.receive is None:
    await asyncio.Event().wait()
    return
  while (await req.receive())["type"] != "http.disconnect":
    pass


class OpenAIRoutes:
  """The /v1 endpoints of one server."""

  def __init__(self, servicer: InferenceServicer):
    self.servicer = servicer
    self.created = int(time.time())  # the models' "created" (bundles carry no date)
    self.trace_marker_secret: str | None = None  # the native relay's (Routes sets it)

  def lookup(self, method: str, rest: list[str]) -> tuple[Callable, tuple]:
    """(handler, args) for the path after /v1; an unknown path or a wrong method gets its
    error (404, 405) in OpenAI's format from the handler."""
    want, handler, args = self._match(rest)
    if handler is None:
      return self._guard(self.not_found), ()
    if method != want and not (method == "HEAD" and want == "GET"):
      return self._guard(self.wrong_method), (want,)
    return self._guard(handler), args

  def _match(self, rest: list[str]) -> tuple[str, Callable | None, tuple]:
    if rest == ["models"]:
      return "GET", self.list_models, ()
    if len(rest) == 2 and rest[0] == "models":
      return "GET", self.get_model, (rest[1],)
    if rest == ["completions"]:
      return "POST", self.completions, ()
    if rest == ["chat", "completions"]:
      return "POST", self.chat_completions, ()
    return "", None, ()

  def _guard(self, handler: Callable) -> Callable:
    async def guarded(req: Request, *args: Any) -> Reply | StreamReply:
      try:
        return await handler(req, *args)
      except ApiError as e:
        return error_reply(e)
      except ServingError as e:
        return error_reply(ApiError.of(e))
    return guarded

  async def wrong_method(self, req: Request, want: str) -> Reply:
    raise ApiError(405, f"{req.path} takes {want}, not {req.method}")

  async def not_found(self, req: Request) -> Reply:
    raise ApiError(404, f"no endpoint {req.method} {req.path}: this server offers GET /v1/models,"
                   " POST /v1/completions and POST /v1/chat/completions", code="not_found")

  def _generators(self) -> dict[str, Any]:
    """Name -> a ready record, for every model whose runner generates text."""
    out = {}
    for rec in self.servicer.repo.records():
      if rec.state is State.READY and isinstance(rec.runner, GenerationRunner):
        out.setdefault(rec.name, rec)
    return out

  async def list_models(self, req: Request) -> Reply:
    return json_reply({"object": "list", "data": [
        model_object(name, self.created) for name in self._generators()]})

  async def get_model(self, req: Request, model: str) -> Reply:
    rec = self._generators().get(model)
    if rec is None:
      raise self._unknown(model)
    return json_reply(model_object(model, self.created))

  @staticmethod
  def _unknown(model: str) -> ApiError:
    return ApiError(404, f"the model {model!r} does not exist (GET /v1/models lists the models"
                    " that generate text)", type="not_found_error", param="model",
                    code="model_not_found")

  async def completions(self, req: Request) -> Reply | StreamReply:
    return await self._generate(req, chat=False)

  async def chat_completions(self, req: Request) -> Reply | StreamReply:
    return await self._generate(req, chat=True)

  async def _generate(self, req: Request, *, chat: bool) -> Reply | StreamReply:
    """One span per request when tracing samples it (its headers decide), over its choices."""
    tracing = self.servicer.tracing
    rt = None if tracing is None else request_trace.start_http(
        tracing, req.headers, req.path, time.perf_counter(), self.trace_marker_secret)
    try:
      run = self._prepare(req, chat=chat)
    except (ApiError, ServingError) as e:  # refused before any generation: the span ends here
      if rt is not None:
        err = e if isinstance(e, ApiError) else ApiError.of(e)
        request_trace.finish_openai(tracing, rt, "", err.status, err.message)
      raise
    run.traced(tracing, rt).start()  # from here the run ends the span
    if run.request.stream:
      return StreamReply(run.chunks(), run.cancel)
    return await self._whole(req, run)

  def _prepare(self, req: Request, *, chat: bool) -> Run:
    """The request parsed and routed to its model's runner, its generations not started."""
    if self.servicer.refusing():
      raise ApiError(503, SHUTTING_DOWN, type="server_error")
    body = load_body(req.body)
    request = parse_chat(body) if chat else parse_completion(body)
    try:
      rec, runner = self.servicer.route(request.model, "")
    except ServingError as e:
      raise self._unknown(request.model) if e.code is Code.NOT_FOUND else ApiError.of(e)
    if not isinstance(runner, GenerationRunner):
      raise ApiError(400, f"the model {request.model!r} does not generate text (it is a"
                     f" {rec.manifest.kind if rec.manifest else 'predict'} model)", param="model")
    return Run(request, rec.name, runner, int(time.time()), version=rec.version)

  async def _whole(self, req: Request, run: Run) -> Reply:
    """The whole answer, unless the client goes first: then every generation is cancelled."""
    answer = asyncio.ensure_future(run.whole())
    gone = asyncio.ensure_future(_disconnected(req))
    try:
      await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
      gone.cancel()
    if not answer.done():
      run.cancel()  # the client left: free the slots and pages now
      logger.info("client of %s left before its answer; cancelled", run.id)
    return json_reply(await answer)
