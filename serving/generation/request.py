"""What a client sends to GenerationService and what it gets back, token by token (no JAX).

Failures use `serving.types.ServingError` with a `Code`, which the servicer maps to a gRPC status.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from serving.types import Code, ServingError

MAX_SEED = 2**31 - 1
MAX_STOP_SEQUENCES = 8
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's top_logprobs limit)


class FinishReason(enum.Enum):
  """Why a stream ended: EOS or a stop sequence, a length limit, a cancel, or a failure."""

  STOP = "stop"
  LENGTH = "length"
  CANCELLED = "cancelled"
  ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
  """Per-request decoding: greedy when temperature is 0; top_k 0 and top_p 1.0 mean off.

  `seed` makes a sampled request reproducible whatever it is batched with (token i is drawn
  with the key fold_in(key(seed), i)); None picks a random one. `stop` strings (str as UTF-8
  or bytes) end the stream before the match; the match itself is not returned. `logprobs`
  (None: off) asks each token event for the token's log-probability and that many best
  alternatives (raw log-softmax of the logits; serving/generation/sampling.py). Invalid values
  raise ServingError(INVALID_ARGUMENT).
  """

  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str | bytes, ...] = ()
  ignore_eos: bool = False
  logprobs: int | None = None

  def __post_init__(self):
    def bad(msg: str) -> ServingError:
      return ServingError(Code.INVALID_ARGUMENT, msg)

    if self.max_new_tokens < 1:
      raise bad(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if not self.temperature >= 0.0:
      raise bad(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise bad(f"top_k={self.top_k} must be >= 0 (0 is off)")
    if not 0.0 < self.top_p <= 1.0:
      raise bad(f"top_p={self.top_p} must be in (0, 1] (1 is off)")
    if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
      raise bad(f"seed={self.seed} must be in [0, {MAX_SEED}]")
    if isinstance(self.stop, (str, bytes)) or len(self.stop) > MAX_STOP_SEQUENCES:
      raise bad(f"stop must be a sequence of at most {MAX_STOP_SEQUENCES} strings")
    if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
      raise bad(f"logprobs={self.logprobs} must be in [0, {MAX_LOGPROBS}]")
    if not all(isinstance(s, (str, bytes)) and s for s in self.stop):
      raise bad(f"stop sequences must be non-empty str or bytes, got {self.stop!r}")

  @property
  def stop_bytes(self) -> tuple[bytes, ...]:
    return tuple(s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in self.stop)


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationRequest:
  """A prompt (str as UTF-8, or bytes) and how to continue it; `request_id` "" gets one assigned."""

  prompt: str | bytes
  sampling: SamplingParams = SamplingParams()
  request_id: str = ""

  def __post_init__(self):
    if not isinstance(self.prompt, (str, bytes)):
      raise ServingError(Code.INVALID_ARGUMENT,
                         f"prompt must be str or bytes, got {type(self.prompt).__name__}")


@dataclasses.dataclass(frozen=True, slots=True)
class RequestMetrics:
  """Timings of one finished request, in seconds (`ttft_s`/`tpot_s` None without tokens)."""

  prompt_tokens: int
  generated_tokens: int
  queue_s: float | None  # submit -> first admitted to a decode slot
  ttft_s: float | None  # submit -> first token
  tpot_s: float | None  # mean time per output token after the first
  total_s: float
  preemptions: int


@dataclasses.dataclass(frozen=True, slots=True)
class GenerationEvent:
  """One step of a stream: a generated token, or the end (finished=True, exactly once).

  `piece` holds the bytes released by this step (held back while they might start a stop
  sequence, so it can be empty or span several tokens); `text` is `piece` decoded as UTF-8
  across steps (a multi-byte character appears once complete). `index` counts generated
  tokens before this one. The final event carries `finish_reason`, `metrics`, and `error`
  when the reason is ERROR. When the request asked for logprobs (and the engine reports them),
  an event with a token carries its `logprob` and `top_logprobs` ((token id, logprob), best first).
  """

  request_id: str
  index: int
  token_id: int | None
  piece: bytes
  text: str
  finished: bool = False
  finish_reason: FinishReason | None = None
  error: ServingError | None = None
  metrics: RequestMetrics | None = None
  logprob: float | None = None
  top_logprobs: tuple[tuple[int, float], ...] = ()


OnEvent = Callable[[GenerationEvent], None]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestHandle:
  """Returned by `GenerationService.submit`; `cancel()` ends the stream and frees its pages."""

  request_id: str
  _cancel: Callable[[str], bool] = dataclasses.field(repr=False, compare=False)

  def cancel(self) -> bool:
    """True if the request was still live."""
    return self._cancel(self.request_id)
