"""Puts a GenerationService behind the same surface the servicer uses for predict models.

Text in and out are Triton BYTES tensors (`text_input` -> `text_output`), sampling comes
from request parameters (max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos).
`submit` (ModelInfer) answers with the whole completion per prompt row; `stream`
(ModelStreamInfer, a decoupled model in Triton's terms) emits one response per released
piece of text and marks the last with the `triton_final_response` parameter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bundle import TensorSpec
from serving.batching import BatchingConfig
from serving.engines.memory import MemoryReport
from serving.generation.request import GenerationEvent, GenerationRequest, SamplingParams
from serving.runners import Observer, RunnerCapabilities, RunnerStats, deliver
from serving.types import Code, InferRequest, ServingError

logger = logging.getLogger(__name__)

TEXT_INPUT = TensorSpec("text_input", "object", (-1,), ("batch",))
TEXT_OUTPUT = TensorSpec("text_output", "object", (-1,), ("batch",))


def sampling_from_parameters(params: Mapping[str, Any]) -> SamplingParams:
  """Triton request parameters -> SamplingParams (INVALID_ARGUMENT on a bad value)."""
  kw: dict[str, Any] = {}
  known = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
           "ignore_eos": bool}
  for key, value in params.items():
    if key in known:
      cast = known[key]
      if isinstance(value, str) and cast is not bool:
        # tritonclient 2.41 cannot send float parameters: numbers may come as strings.
        try:
          value = cast(value)
        except ValueError:
          raise ServingError(Code.INVALID_ARGUMENT, f"parameter {key!r}={value!r} is not a"
                             f" {cast.__name__}") from None
      if isinstance(value, bool) != (cast is bool) or isinstance(value, str):
        raise ServingError(Code.INVALID_ARGUMENT, f"parameter {key!r} must be {cast.__name__}")
      kw["max_new_tokens" if key == "max_tokens" else key] = cast(value)
    elif key == "stop":
      if not isinstance(value, str):
        raise ServingError(Code.INVALID_ARGUMENT, "parameter 'stop' must be a string: one stop"
                           " sequence, or a JSON list of them")
      try:
        stop = json.loads(value) if value.startswith("[") else [value]
      except json.JSONDecodeError as e:
        raise ServingError(Code.INVALID_ARGUMENT, f"parameter 'stop' is not valid JSON: {e}")
      kw["stop"] = tuple(stop)
  return SamplingParams(**kw)


def _text_of(value: Any) -> bytes:
  return value if isinstance(value, bytes) else str(value).encode("utf-8")


class GenerationRunner:
  """Adapter: GenerationService <-> InferRequest / streamed Triton responses."""

  capabilities = RunnerCapabilities(decoupled=True, wants_parameters=True)
  inputs = (TEXT_INPUT,)
  outputs = (TEXT_OUTPUT,)

  def __init__(self, name: str, service: Any, *, observer: Observer | None = None):
    self.name = name
    self.service = service
    self.observer = observer or Observer()
    self.config = BatchingConfig(buckets=(1,), max_queue_delay_s=0.0)
    self.stats = RunnerStats()
    self._lock = threading.Lock()
    self._pending = 0

  def start(self) -> None:
    self.service.start()

  @property
  def pending_requests(self) -> int:
    return self._pending

  def stop(self, *, drain: bool = True, timeout: float = 30.0) -> None:
    self.service.stop(drain=drain, timeout=timeout)

  def close(self) -> None:
    """Device memory (params, KV cache) goes with the service once it is stopped."""

  def memory(self) -> MemoryReport:
    """The engine's params, KV cache and code per device (unknown for engines that cannot tell)."""
    memory = getattr(self.service.engine, "memory", None)
    return MemoryReport.unknown() if memory is None else memory()

  def _submit_prompt(self, prompt: bytes, sampling: SamplingParams, request_id: str,
                     on_event: Callable[[GenerationEvent], None]) -> Any:
    return self.service.submit(GenerationRequest(prompt, sampling, request_id), on_event)

  def submit(self, req: InferRequest) -> None:
    """Whole completions, one per prompt row; delivered together when all are done."""
    sampling = sampling_from_parameters(req.parameters or {})
    prompts = [_text_of(v) for v in req.inputs["text_input"].reshape(-1)]
    texts: list[bytearray] = [bytearray() for _ in prompts]
    left = [len(prompts)]
    handles: list[Any] = []
    failed: list[ServingError] = []

    def on_event(i: int, ev: GenerationEvent) -> None:
      texts[i] += ev.piece
      if not ev.finished:
        return
      with self._lock:
        if ev.error is not None and not failed:
          failed.append(ev.error)
        left[0] -= 1
        done = left[0] == 0
      if done:
        self._finish(req, texts, failed[0] if failed else None, ev)

    with self._lock:
      self._pending += 1
    try:
      for i, prompt in enumerate(prompts):
        # Client ids may repeat across clients: the service assigns its own.
        handles.append(self._submit_prompt(prompt, sampling, "",
                                           lambda ev, i=i: on_event(i, ev)))
    except ServingError:
      for h in handles:
        h.cancel()
      with self._lock:
        self._pending -= 1
      raise

  def _finish(self, req: InferRequest, texts: list[bytearray], error: ServingError | None,
              last: GenerationEvent) -> None:
    with self._lock:
      self._pending -= 1
    now = time.perf_counter()
    st = self.stats
    if error is None:
      st.success_count += 1
      st.success_ns += int((now - req.arrival) * 1e9)
      st.inference_count += len(texts)
      st.execution_count += 1
      out = np.empty(len(texts), dtype=object)
      out[:] = [bytes(t) for t in texts]
      deliver([(req, {"text_output": out}, None)])
    else:
      st.fail_count += 1
      st.fail_ns += int((now - req.arrival) * 1e9)
      deliver([(req, None, error)])
    self.observer.request_done(ok=error is None, duration_s=now - req.arrival,
                               code=None if error is None else error.code)

  def stream(self, prompt: bytes, parameters: Mapping[str, Any], request_id: str,
             on_event: Callable[[GenerationEvent], None]) -> Any:
    """Starts one streamed generation; `on_event` gets every event (engine thread)."""
    return self.stream_sampling(prompt, sampling_from_parameters(parameters), on_event)

  def stream_sampling(self, prompt: bytes, sampling: SamplingParams,
                      on_event: Callable[[GenerationEvent], None]) -> Any:
    """`stream` with the sampling already decided (the OpenAI API parses its own); counted in
    the model's statistics as any stream. Returns the handle; raises ServingError if refused."""
    t0 = time.perf_counter()

    def wrapped(ev: GenerationEvent) -> None:
      if ev.finished:
        ok = ev.error is None
        if ok:
          self.stats.success_count += 1
          self.stats.inference_count += 1
        else:
          self.stats.fail_count += 1
        self.observer.request_done(ok=ok, duration_s=time.perf_counter() - t0,
                                   code=None if ok else ev.error.code)
      on_event(ev)

    return self._submit_prompt(prompt, sampling, "", wrapped)


def load_generation_runner(path: Any, name: str, *, observer: Observer | None = None,
                           progress: Callable[[str], None] | None = None,
                           config: Any = None, draft_path: Any = None,
                           sharding: str | None = None,
                           devices: Sequence[Any] | None = None) -> GenerationRunner:
  """Loads a generate bundle (compiling every shape) and wraps it; raises BundleError.
  `config`: a ServiceConfig (default: ServiceConfig()); `draft_path`: a draft model's bundle
  (on the first device); `sharding` "tensor" splits the model over `devices`
  (serving/generation/placement.py); default: the first device."""
  import bundle as bundle_lib
  from serving.generation.placement import lm_placement
  from serving.generation.service import GenerationService, ServiceConfig

  placement = None
  if devices is not None and (len(devices) > 1 or sharding is not None):
    placement = lm_placement(bundle_lib.read_manifest(path), strategy=sharding,
                             devices=devices)
  service = GenerationService.from_bundle(path, progress=progress,
                                          config=config or ServiceConfig(),
                                          draft_directory=draft_path, placement=placement)
  return GenerationRunner(name, service, observer=observer)
