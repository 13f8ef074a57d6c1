"""Admin endpoints of the HTTP front end (behind the same bearer token as the rest):

  POST /v2/admin/profile          {"seconds": N, "trace": true, "python": false}: captures a profile of the running
                                  server for N seconds (serving/telemetry/profile.py) and answers
                                  its per-stage breakdown; one capture at a time (409 otherwise)
  GET  /v2/admin/profile/trace    the last capture's trace (Chrome trace format, gzipped JSON)
  POST /v2/admin/tracing          {"rate": R}: tracing's sampling rate from now on (a server
                                  started with --otlp-endpoint); answers {"rate": R}
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any, Callable

from serving.frontend.http import tensors
from serving.frontend.http.app import HttpError, Reply, Request, json_reply

MAX_PROFILE_S = 600.0


class AdminRoutes:
  """The /v2/admin endpoints; `profiler()` gives the server's Profiler (None: not offered)."""

  def __init__(self, profiler: Callable[[], Any], set_trace_rate: Callable[[], Any]):
    self._profiler, self._set_trace_rate = profiler, set_trace_rate
    self._last_trace: str | None = None

  def match(self, rest: list[str]) -> tuple[str, Callable, tuple] | None:
    if rest == ["profile"]:
      return "POST", self.profile, ()
    if rest == ["profile", "trace"]:
      return "GET", self.trace, ()
    if rest == ["tracing"]:
      return "POST", self.tracing, ()
    return None

  def _get(self) -> Any:
    profiler = self._profiler()
    if profiler is None:
      raise HttpError(404, "this server offers no profiling")
    return profiler

  async def profile(self, req: Request) -> Reply:
    profiler = self._get()
    opts = tensors.load_json(req.body, "the profile request") if req.body.strip() else {}
    if unknown := sorted(set(opts) - {"seconds", "trace", "python"}):
      raise tensors.bad(f"unknown profile options {unknown}: it takes seconds, trace, python")
    seconds = opts.get("seconds", 5)
    trace, python = opts.get("trace", True), opts.get("python", False)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
        0 < seconds <= MAX_PROFILE_S):
      raise tensors.bad(f"'seconds' must be a number in (0, {MAX_PROFILE_S:g}], got {seconds!r}")
    for key, value in (("trace", trace), ("python", python)):
      if not isinstance(value, bool):
        raise tensors.bad(f"'{key}' must be true or false, got {value!r}")
    try:
      report = await asyncio.to_thread(profiler.capture, float(seconds), trace=trace,
                                       python=python)
    except RuntimeError as e:  # one capture at a time
      raise HttpError(409, str(e)) from None
    if report.get("trace_file"):
      self._last_trace = report["trace_file"]
    return json_reply(report)

  async def trace(self, req: Request) -> Reply:
    self._get()
    if self._last_trace is None:
      raise HttpError(404, "no profile captured yet: POST /v2/admin/profile first")
    body = await asyncio.to_thread(pathlib.Path(self._last_trace).read_bytes)
    return Reply(200, body, b"application/gzip")

  async def tracing(self, req: Request) -> Reply:
    setter = self._set_trace_rate()
    if setter is None:
      raise HttpError(404, "tracing is off: start the server with --otlp-endpoint HOST:PORT")
    opts = tensors.load_json(req.body, "the tracing request") if req.body.strip() else {}
    rate = opts.get("rate")
    if set(opts) != {"rate"} or isinstance(rate, bool) or not isinstance(rate, (int, float)) or (
        not 0 <= rate <= 1):
      raise tensors.bad(f"send {{\"rate\": R}} with R in [0, 1], got {opts!r}")
    setter(float(rate))
    return json_reply({"rate": float(rate)})
