"""OpenAI API requests (`/v1/completions`, `/v1/chat/completions`) parsed into our sampling terms.

Every mistake raises ApiError, which carries OpenAI's error fields (HTTP status, message, type,
param, code). A field OpenAI defines but we do not implement is refused by name unless it holds
its no-op value, and an unknown field is refused, so a client never silently gets something
other than what it asked for. Chat messages are rendered onto the byte tokenizer by
`render_chat`'s template.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from serving.generation.request import MAX_LOGPROBS, MAX_SEED, MAX_STOP_SEQUENCES, SamplingParams
from serving.types import Code, ServingError

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per completions request
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions API's `logprobs`
ROLES = ("system", "developer", "user", "assistant", "tool")

# Status and OpenAI error type of each of our error codes (429 for a full queue, 503 when
# shutting down or a model is being unloaded).
_STATUS = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"), Code.NOT_FOUND: (404, "not_found_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"), Code.UNAVAILABLE: (503, "server_error"),
    Code.DEADLINE_EXCEEDED: (503, "server_error"), Code.INTERNAL: (500, "server_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"), Code.CANCELLED: (400, "invalid_request_error"),
}
# Fields we accept and ignore (they do not change what is generated).
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# Fields we do not implement, with the value that means "off" (anything else is refused).
_NOOP = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
         "echo": (False,), "suffix": ("",), "response_format": ({"type": "text"},),
         "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
         "repetition_penalty": (1, 1.0)}
_COMMON = frozenset({"model", "n", "stream", "stream_options", "max_tokens", "temperature",
                     "top_p", "top_k", "seed", "stop", "ignore_eos"})
_COMPLETION = _COMMON | {"prompt", "logprobs", "best_of"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


class ApiError(Exception):
  """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  @classmethod
  def of(cls, e: ServingError) -> ApiError:
    """Our error (from the servicer, the scheduler, the sampling checks) in OpenAI's terms."""
    status, kind = _STATUS.get(e.code, (500, "server_error"))
    code = "model_not_found" if e.code is Code.NOT_FOUND else None
    return cls(status, e.message, type=kind, code=code)

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
  return ApiError(400, message, param=param, code="invalid_value" if param else None)


@dataclasses.dataclass(frozen=True, slots=True)
class ApiRequest:
  """A completions or chat request: each prompt gets `n` choices, each its own sequence."""

  chat: bool
  model: str
  prompts: tuple[bytes, ...]
  n: int
  stream: bool
  include_usage: bool
  max_tokens: int | None  # None: up to the model's length limit
  temperature: float
  top_p: float
  top_k: int
  seed: int | None
  stop: tuple[str, ...]
  logprobs: int | None  # alternatives per token (None: no logprobs)
  ignore_eos: bool

  def sampling(self, choice: int, max_new_tokens: int) -> SamplingParams:
    """Choice `choice` of a prompt: a seeded request draws choice j with seed + j, so the
    choices differ and each is reproducible."""
    seed = None if self.seed is None else (self.seed + choice) % (MAX_SEED + 1)
    try:
      return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature,
                            top_k=self.top_k, top_p=self.top_p, seed=seed, stop=self.stop,
                            ignore_eos=self.ignore_eos, logprobs=self.logprobs)
    except ServingError as e:
      raise bad(None, e.message) from None


def load_body(body: bytes) -> dict[str, Any]:
  """The JSON object of a request body."""
  try:
    obj = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise bad(None, f"the request body is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise bad(None, "the request body must be a JSON object")
  return obj


def _number(obj: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *,
            open_lo: bool = False) -> float:
  v = obj.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise bad(name, f"'{name}' must be a number, got {json.dumps(v)}")
  if not (lo < v if open_lo else lo <= v) or not v <= hi:
    span = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
    raise bad(name, f"'{name}'={v} must be in {span}")
  return float(v)


def _int(obj: Mapping[str, Any], name: str, default: int | None, lo: int,
         hi: int | None) -> int | None:
  v = obj.get(name)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, int):
    raise bad(name, f"'{name}' must be an integer, got {json.dumps(v)}")
  if v < lo or (hi is not None and v > hi):
    raise bad(name, f"'{name}'={v} must be in [{lo}, {'inf' if hi is None else hi}]")
  return v


def _bool(obj: Mapping[str, Any], name: str) -> bool:
  v = obj.get(name)
  if v is None:
    return False
  if not isinstance(v, bool):
    raise bad(name, f"'{name}' must be true or false, got {json.dumps(v)}")
  return v


def _check_fields(obj: Mapping[str, Any], known: frozenset[str]) -> None:
  for name, value in obj.items():
    if name in known or name in _IGNORED or value is None:
      continue
    if name in _NOOP:
      if isinstance(value, bool) != isinstance(_NOOP[name][0], bool) or value not in _NOOP[name]:
        raise bad(name, f"'{name}' is not supported by this server (leave it unset)")
      continue
    raise bad(name, f"unknown field '{name}'")


def _stop(obj: Mapping[str, Any]) -> tuple[str, ...]:
  v = obj.get("stop")
  stops = [] if v is None else [v] if isinstance(v, str) else v
  if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
      or not all(isinstance(s, str) and s for s in stops)):
    raise bad("stop", f"'stop' must be a non-empty string or a list of at most"
              f" {MAX_STOP_SEQUENCES} non-empty strings")
  return tuple(stops)


def _common(obj: Mapping[str, Any], *, chat: bool, prompts: tuple[bytes, ...],
            max_tokens: int | None, logprobs: int | None) -> ApiRequest:
  model = obj.get("model")
  if not isinstance(model, str) or not model:
    raise bad("model", "'model' must name a model (GET /v1/models lists them)")
  stream = _bool(obj, "stream")
  options = obj.get("stream_options")
  if options is not None and (not stream or not isinstance(options, dict)
                              or set(options) - {"include_usage", "continuous_usage_stats"}):
    raise bad("stream_options", "'stream_options' is an object ({\"include_usage\": true}) and"
              " only allowed when 'stream' is true")
  include_usage = _bool(options or {}, "include_usage")
  top_k = _int(obj, "top_k", 0, -1, None)
  seed = _int(obj, "seed", None, -(2**63), 2**63 - 1)
  return ApiRequest(
      chat=chat, model=model, prompts=prompts, n=_int(obj, "n", 1, 1, MAX_N), stream=stream,
      include_usage=include_usage, max_tokens=max_tokens,
      temperature=_number(obj, "temperature", 1.0, 0.0, 2.0),
      top_p=_number(obj, "top_p", 1.0, 0.0, 1.0, open_lo=True), top_k=max(top_k, 0),
      seed=seed, stop=_stop(obj), logprobs=logprobs, ignore_eos=_bool(obj, "ignore_eos"))


def parse_completion(obj: Mapping[str, Any]) -> ApiRequest:
  """POST /v1/completions: `prompt` a string or a list of strings; `logprobs` an int."""
  _check_fields(obj, _COMPLETION)
  prompt = obj.get("prompt")
  prompts = [prompt] if isinstance(prompt, str) else prompt
  if (not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_PROMPTS
      or not all(isinstance(p, str) for p in prompts)):
    raise bad("prompt", f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings"
              " (token-id prompts are not supported)")
  best_of = obj.get("best_of")
  if best_of is not None and best_of != obj.get("n", 1):
    raise bad("best_of", "'best_of' is not supported (leave it unset or equal to n)")
  return _common(obj, chat=False, prompts=tuple(p.encode("utf-8") for p in prompts),
                 max_tokens=_int(obj, "max_tokens", 16, 1, None),
                 logprobs=_int(obj, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS))


def parse_chat(obj: Mapping[str, Any]) -> ApiRequest:
  """POST /v1/chat/completions: `messages` rendered by `render_chat`; `logprobs` a bool and
  `top_logprobs` an int."""
  _check_fields(obj, _CHAT)
  max_tokens = _int(obj, "max_completion_tokens", None, 1, None)
  if max_tokens is None:
    max_tokens = _int(obj, "max_tokens", None, 1, None)
  top = _int(obj, "top_logprobs", None, 0, MAX_LOGPROBS)
  if top is not None and not _bool(obj, "logprobs"):
    raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
  logprobs = (top or 0) if _bool(obj, "logprobs") else None
  return _common(obj, chat=True, prompts=(render_chat(obj.get("messages")).encode("utf-8"),),
                 max_tokens=max_tokens, logprobs=logprobs)


def _content(m: Mapping[str, Any], i: int) -> str:
  content = m.get("content")
  if content is None:
    return ""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in content):
    return "".join(p["text"] for p in content)
  raise bad(f"messages[{i}].content", "a message's content must be a string or a list of"
            " {\"type\": \"text\", \"text\": ...} parts (this model reads text only)")


def render_chat(messages: Any) -> str:
  """The chat template: each message as `<|role|>\\n` + its text + `\\n`, then
  `<|assistant|>\\n`, after which the model writes the answer."""
  if not isinstance(messages, list) or not messages:
    raise bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise bad(f"messages[{i}].role", f"each message needs a 'role' among {list(ROLES)}")
    out.append(f"<|{m['role']}|>\n{_content(m, i)}\n")
  return "".join(out) + "<|assistant|>\n"
