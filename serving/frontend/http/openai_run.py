"""One OpenAI completions or chat request in flight: its choices as generations, their answer.

Each prompt gets `n` choices, each a sequence of its own in the generation service. Events come
from the engine thread onto an asyncio queue; `whole()` gathers them into one completion object
and `chunks()` turns them into server-sent events (OpenAI's chunk objects, then `data: [DONE]`).
`cancel()` ends every sequence at once (the client went away), freeing its slot and KV pages.

Logprobs follow the byte tokenizer: one entry per byte of the returned text, so a stop
sequence's bytes (never returned) and EOS have none; a token is shown as its character, or
`bytes:\\xNN` for a byte that is not ASCII.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Any, AsyncIterator, Mapping

from serving.frontend import request_trace
from serving.frontend.http.generate import sse
from serving.frontend.http.openai_schema import ApiError, ApiRequest
from serving.generation.request import FinishReason, GenerationEvent
from serving.types import ServingError

DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass(slots=True, eq=False)
class _Choice:
  """One sequence's progress."""

  index: int
  first: bool  # the first choice of its prompt: its prompt is counted in usage
  handle: Any = None
  text: list[str] = dataclasses.field(default_factory=list)
  pending: list[tuple[int, float, tuple]] = dataclasses.field(default_factory=list)
  entries: list[tuple[int, float, tuple, int]] = dataclasses.field(default_factory=list)
  chars: int = 0  # characters of the text so far (for text_offset)
  finish: str | None = None
  prompt_tokens: int = 0
  generated: int = 0
  metrics: Any = None  # its generation's timings, once finished


class Run:
  """The generations of one request on one model's runner (a GenerationRunner)."""

  def __init__(self, request: ApiRequest, model: str, runner: Any, created: int, *,
               version: int = 0):
    self.request = request
    self.model = model
    self.runner = runner
    spec = runner.service.engine.spec
    self.max_new_tokens = request.max_tokens or spec.max_seq_len  # capped by the scheduler
    self.num_bytes = int(spec.tokenizer.get("num_bytes", 256))
    self.specials = {spec.eos_id: "<eos>", spec.bos_id: "<bos>", spec.pad_id: "<pad>"}
    self.created = created
    self.id = ("chatcmpl-" if request.chat else "cmpl-") + secrets.token_hex(12)
    self.choices = [_Choice(i * request.n + j, j == 0) for i in range(len(request.prompts))
                    for j in range(request.n)]
    self._events: asyncio.Queue = asyncio.Queue()
    self._open = False
    self._trace: tuple[Any, Any] | None = None  # (tracing, request trace) while sampled, open
    self.version = version

  def traced(self, tracing: Any, rt: Any) -> Run:
    """Ends request trace `rt` (None: not sampled) when this run ends, however it ends."""
    if rt is not None:
      rt.submitted(self.model, self.version, len(self.choices))
      self._trace = (tracing, rt)
    return self

  def end_trace(self, status: int, error: ApiError | None = None) -> None:
    """Ends the request's span, once: its choices' generations, the status and error."""
    if self._trace is None:
      return
    (tracing, rt), self._trace = self._trace, None
    request_trace.finish_openai(tracing, rt, self.id, status,
                                None if error is None else error.message,
                                [ch.metrics for ch in self.choices],
                                [ch.finish for ch in self.choices], self.usage())

  def start(self) -> Run:
    """Submits every choice; on a refusal cancels those already started and raises it."""
    loop = asyncio.get_running_loop()
    r = self.request
    try:
      for ch in self.choices:
        prompt, j = divmod(ch.index, r.n)
        ch.handle = self.runner.stream_sampling(
            r.prompts[prompt], r.sampling(j, self.max_new_tokens),
            lambda ev, i=ch.index: loop.call_soon_threadsafe(self._events.put_nowait, (i, ev)))
    except ServingError as e:
      self._cancel_all()
      err = ApiError.of(e)
      self.end_trace(err.status, err)
      raise err from None
    self._open = True
    return self

  def _cancel_all(self) -> None:
    for ch in self.choices:
      if ch.handle is not None and ch.finish is None:
        ch.handle.cancel()  # frees the slot and KV pages now

  def cancel(self) -> None:
    """Ends every generation still running (idempotent); `chunks()` then ends."""
    self.end_trace(499, ApiError(499, "the client went away"))
    if self._open:
      self._open = False
      self._cancel_all()
      self._events.put_nowait(None)

  # -- events -----------------------------------------------------------------------------

  def _take(self, ch: _Choice, ev: GenerationEvent) -> list[tuple[int, float, tuple, int]]:
    """Records one event; returns the logprob entries of the bytes it released."""
    if ev.logprob is not None and ev.token_id is not None and ev.token_id < self.num_bytes:
      ch.pending.append((ev.token_id, ev.logprob, ev.top_logprobs))
    released = []
    for tok, lp, top in ch.pending[:len(ev.piece)]:
      released.append((tok, lp, top, ch.chars))
      ch.chars += (tok & 0xC0) != 0x80  # a UTF-8 continuation byte starts no character
    del ch.pending[:len(ev.piece)]
    ch.entries += released
    ch.text.append(ev.text)
    if ev.finished:
      ch.metrics = ev.metrics
      if ev.error is not None:
        raise ApiError.of(ev.error)
      if ev.finish_reason is FinishReason.CANCELLED:
        raise ApiError(503, "the generation was cancelled: the server is shutting down",
                       type="server_error")
      ch.finish = ev.finish_reason.value  # "stop" or "length"
      ch.prompt_tokens = ev.metrics.prompt_tokens if ch.first else 0
      ch.generated = ev.metrics.generated_tokens
    return released

  async def _next(self) -> tuple[_Choice, GenerationEvent] | None:
    item = await self._events.get()
    return None if item is None else (self.choices[item[0]], item[1])

  def _left(self) -> int:
    return sum(ch.finish is None for ch in self.choices)

  def usage(self) -> dict[str, int]:
    prompt = sum(ch.prompt_tokens for ch in self.choices)
    done = sum(ch.generated for ch in self.choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

  # -- answers ----------------------------------------------------------------------------

  def _token(self, tok: int) -> str:
    if tok < 128:
      return chr(tok)
    return f"bytes:\\x{tok:02x}" if tok < self.num_bytes else self.specials.get(tok, f"<{tok}>")

  def _bytes(self, tok: int) -> list[int] | None:
    return [tok] if tok < self.num_bytes else None

  def _logprobs(self, entries: list[tuple[int, float, tuple, int]]) -> dict[str, Any] | None:
    """OpenAI's logprobs object for these entries (None when the request asked for none)."""
    if self.request.logprobs is None:
      return None
    if self.request.chat:
      return {"content": [{
          "token": self._token(tok), "logprob": lp, "bytes": self._bytes(tok),
          "top_logprobs": [{"token": self._token(t), "logprob": v, "bytes": self._bytes(t)}
                           for t, v in top]} for tok, lp, top, _ in entries], "refusal": None}
    return {"tokens": [self._token(e[0]) for e in entries],
            "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [{self._token(t): v for t, v in e[2]} for e in entries],
            "text_offset": [e[3] for e in entries]}

  def _head(self, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" if self.request.chat else "text_completion") + (
        ".chunk" if chunk and self.request.chat else "")
    return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

  async def whole(self) -> dict[str, Any]:
    """Waits for every choice; the completion object (ApiError if a generation failed)."""
    try:
      while self._left():
        got = await self._next()
        if got is None:
          raise ApiError(499, "the client went away")
        self._take(*got)
    except ApiError as e:
      self.end_trace(e.status, e)
      self.cancel()
      raise
    self._open = False
    self.end_trace(200)
    out = []
    for ch in self.choices:
      text = "".join(ch.text)
      body: dict[str, Any] = ({"message": {"role": "assistant", "content": text}}
                              if self.request.chat else {"text": text})
      out.append({"index": ch.index, **body, "logprobs": self._logprobs(ch.entries),
                  "finish_reason": ch.finish})
    return {**self._head(False), "choices": out, "usage": self.usage()}

  def _chunk(self, ch: _Choice, text: str, entries: list, finish: str | None,
             role: bool = False) -> bytes:
    if self.request.chat:
      delta = {"role": "assistant", "content": ""} if role else (
          {"content": text} if text else {})
      choice = {"index": ch.index, "delta": delta}
    else:
      choice = {"index": ch.index, "text": text}
    choice.update(logprobs=None if role else self._logprobs(entries), finish_reason=finish)
    return sse({**self._head(True), "choices": [choice]})

  async def chunks(self) -> AsyncIterator[bytes]:
    """Server-sent events: each choice's pieces as they come, usage if asked, [DONE]."""
    if self.request.chat:
      for ch in self.choices:
        yield self._chunk(ch, "", [], None, role=True)
    try:
      while self._left():
        got = await self._next()
        if got is None:  # cancelled: the client is gone
          return
        ch, ev = got
        entries = self._take(ch, ev)
        if ev.text or entries or ch.finish is not None:
          yield self._chunk(ch, ev.text, entries, ch.finish)
    except ApiError as e:
      self.end_trace(e.status, e)
      self.cancel()
      yield sse(e.body())
      yield DONE
      return
    self._open = False
    self.end_trace(200)
    if self.request.include_usage:
      yield sse({**self._head(True), "choices": [], "usage": self.usage()})
    yield DONE


def model_object(name: str, created: int) -> Mapping[str, Any]:
  """One entry of GET /v1/models."""
  return {"id": name, "object": "model", "created": created, "owned_by": "xlaserve"}
