"""GenerationService: the engine loop in its own thread, streaming token events to callers.

    service = GenerationService.from_bundle("model_repo/decoder/1").start()
    handle = service.submit(GenerationRequest("Acme shoes:", SamplingParams(max_new_tokens=32)),
                            on_event)          # raises ServingError if refused
    ...                                        # on_event(GenerationEvent) from the engine thread
    handle.cancel()                            # or service.cancel(request_id)
    service.stop()                             # drains running and waiting requests

`on_event` runs on the engine thread and must return quickly: an asyncio servicer passes
`lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev)`. Each request gets token events
and then exactly one final event (`finished=True`). Each loop iteration runs the scheduler's
prefill batch(es), then one decode step over every running sequence (serving/generation/
scheduler.py); with a bundle that has extend signatures, prefill is chunked under a token
budget and full pages are shared by prefix (serving/generation/chunking.py). Scheduling happens
under a lock, engine calls outside it, so `submit`, `cancel` and `stats` never wait for the device.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from serving.generation.chunking import ChunkedScheduler, ChunkRow, chunk_config
from serving.generation.chunked_step import ChunkedSteps
from serving.generation.draft_model import DraftModel
from serving.generation.spec_step import SpecSteps
from serving.generation.speculative import (SpeculativeConfig, SpeculativeScheduler,
                                            verify_buckets)
from serving.generation.step_inputs import StepInputs
from serving.generation.engine_api import Engine, StepLogprobs
from serving.generation.request import (MAX_SEED, FinishReason, GenerationEvent,
                                        GenerationRequest, OnEvent, RequestHandle,
                                        RequestMetrics, SamplingParams)
from serving.generation.scheduler import DecodeRow, PrefillRow, Scheduler, Seq
from serving.generation.text import ByteCodec, StopMatcher, utf8_stream
from serving.types import Code, ServingError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceConfig:
  """Admission policy (see SchedulerConfig); `static_batching` is for comparison benchmarks.

  Chunked prefill and prefix caching (ChunkConfig) apply when the bundle has extend signatures
  and batching is not static; `max_num_batched_tokens` None: decode_batch + largest chunk.
  `speculative` (speculative decoding, serving/generation/speculative.py) needs both and the
  bundle's verify signatures.
  """

  max_waiting: int = 256
  max_prefill_batches_per_step: int = 1
  watermark_pages: int = 0
  static_batching: bool = False
  chunked_prefill: bool = True
  max_num_batched_tokens: int | None = None
  prefix_caching: bool = True
  speculative: SpeculativeConfig | None = None


@dataclasses.dataclass(slots=True, eq=False)
class _Live:
  """A request between submit and its final event."""

  request_id: str
  sampling: SamplingParams
  seed: int
  on_event: OnEvent
  prompt_len: int
  submitted: float
  stop: StopMatcher
  utf8: Any
  admitted: float | None = None
  first: float | None = None
  last: float | None = None


_Emit = list[tuple[_Live, GenerationEvent]]


class GenerationService(ChunkedSteps, SpecSteps, StepInputs):
  """Continuous batching over one engine; thread-safe submit/cancel/stats."""

  def __init__(self, engine: Engine, *, config: ServiceConfig = ServiceConfig(),
               owns_engine: bool = False, clock: Callable[[], float] = time.perf_counter,
               draft: Engine | None = None):
    """`draft`: the draft model's engine for `SpeculativeConfig(method="draft")` (closed with
    the service when it owns the engines)."""
    self.engine = engine
    self.config = config
    self._owns_engine = owns_engine
    self._clock = clock
    spec = engine.spec
    self._codec = ByteCodec.from_spec(spec.tokenizer)
    sched_config = spec.scheduler_config(
        max_waiting=config.max_waiting, watermark_pages=config.watermark_pages,
        max_prefill_batches_per_step=config.max_prefill_batches_per_step,
        static_batching=config.static_batching)
    chunk = chunk_config(spec, config)
    self._verify_buckets = verify_buckets(spec, config.speculative, chunked=chunk is not None,
                                          has_draft=draft is not None)
    self._draft = None if draft is None else DraftModel(draft, spec)
    self._sched = (Scheduler(sched_config) if chunk is None
                   else ChunkedScheduler(sched_config, chunk) if config.speculative is None
                   else SpeculativeScheduler(sched_config, chunk, config.speculative))
    self._chunked = chunk is not None
    self._cv = threading.Condition()
    self._live: dict[Hashable, _Live] = {}
    self._outbox: _Emit = []  # events made off the engine thread (cancel), sent by it
    self._ids = itertools.count(1)
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._drain = True
    self._counters = dict.fromkeys((
        "requests_submitted", "requests_refused", "requests_finished_stop",
        "requests_finished_length", "requests_cancelled", "requests_failed", "tokens_generated",
        "prefill_calls", "prefill_rows", "prefill_tokens", "decode_steps", "decode_rows",
        "engine_failures", "ttft_seconds_sum", "ttft_count", "tpot_seconds_sum", "tpot_count",
        "queue_seconds_sum", "queue_count", "spec_verify_steps", "spec_draft_tokens",
        "spec_accepted_tokens"), 0)

  @classmethod
  def from_bundle(cls, directory: str | os.PathLike[str], *,
                  config: ServiceConfig = ServiceConfig(), platform: str | None = None,
                  compile_counter: Any = None, progress: Callable[[str], None] | None = None,
                  draft_directory: str | os.PathLike[str] | None = None,
                  placement: Any = None) -> GenerationService:
    """Loads a generate bundle (compiling every shape; raises BundleError) into a new service;
    `draft_directory`: the draft model's bundle (speculative decoding with a draft LM, on the
    first device); `placement`: the target's LMPlacement (default: one device)."""
    from serving.generation.engine import BundleEngine  # JAX only when serving a bundle

    engines = []
    try:
      for path, where in ((directory, placement), (draft_directory, None)):
        if path is not None:
          engines.append(BundleEngine(path, platform=platform, compile_counter=compile_counter,
                                      progress=progress, placement=where))
      return cls(engines[0], config=config, owns_engine=True,
                 draft=engines[1] if len(engines) > 1 else None)
    except Exception:  # e.g. speculation this bundle cannot do: free the device memory
      for engine in engines:
        engine.close()
      raise

  # --- caller-facing API (any thread) ---

  def start(self) -> GenerationService:
    with self._cv:
      if self._thread is None:
        self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._thread.start()
    return self

  def __enter__(self) -> GenerationService:
    return self.start()

  def __exit__(self, *exc: Any) -> None:
    self.stop()

  def submit(self, request: GenerationRequest, on_event: OnEvent) -> RequestHandle:
    """Queues a request; raises ServingError (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE)."""
    prompt = self._codec.encode(request.prompt)
    sp = request.sampling
    with self._cv:
      if self._thread is None or self._stopping:
        raise ServingError(Code.UNAVAILABLE, "the generation service is not running")
      rid = request.request_id or f"gen-{next(self._ids)}"
      if rid in self._live:
        raise ServingError(Code.INVALID_ARGUMENT, f"request id {rid!r} is already live")
      try:
        self._sched.add(rid, prompt, sp.max_new_tokens)
      except ServingError:
        self._counters["requests_refused"] += 1
        raise
      self._live[rid] = _Live(
          rid, sp, secrets.randbelow(MAX_SEED + 1) if sp.seed is None else sp.seed, on_event,
          len(prompt), self._clock(), StopMatcher(sp.stop_bytes), utf8_stream())
      self._counters["requests_submitted"] += 1
      self._cv.notify()
    return RequestHandle(rid, self.cancel)

  def cancel(self, request_id: str | RequestHandle) -> bool:
    """Ends a live request now (slot and pages freed); its final event says CANCELLED."""
    rid = request_id.request_id if isinstance(request_id, RequestHandle) else request_id
    with self._cv:
      live = self._live.get(rid)
      if live is None:
        return False
      self._outbox.append(self._retire(live, FinishReason.CANCELLED, None, b"", None))
      self._cv.notify()
    return True

  def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
    """Stops taking requests; with `drain`, finishes live ones first (cancels them after
    `timeout` seconds), else cancels them now. Closes the engine if the service loaded it."""
    with self._cv:
      self._stopping, self._drain = True, self._drain and drain
      self._cv.notify()
      thread = self._thread
    if thread is not None:
      thread.join(timeout)
      if thread.is_alive():
        with self._cv:
          self._drain = False
          self._cv.notify()
        thread.join()
    if self._owns_engine:
      self.engine.close()
      if self._draft is not None:
        self._draft.close()
      self._owns_engine = False

  def stats(self) -> dict[str, float]:
    """Counters (cumulative) and gauges as plain numbers, for Prometheus or logs."""
    with self._cv:
      pool = self._sched.pool
      return {
          **self._counters,
          "running": self._sched.num_running,
          "waiting": self._sched.num_waiting,
          "decode_slots": self._sched.config.decode_batch,
          "kv_pages_used": pool.num_used,
          "kv_pages_total": pool.capacity,
          "kv_cache_usage": pool.usage,
          "preemptions": self._sched.num_preemptions,
          "prefix_cache_hits": getattr(pool, "hit_tokens", 0),
          "prefix_cache_queries": getattr(pool, "queried_tokens", 0),
          "prefix_cache_pages": getattr(pool, "num_cached", 0),
          "spec_acceptance_rate": (self._counters["spec_accepted_tokens"]
                                   / max(1, self._counters["spec_draft_tokens"])),
      }

  # --- engine thread ---

  def _loop(self) -> None:
    while True:
      with self._cv:
        while not (self._outbox or self._live or self._stopping):
          self._cv.wait()
        emit, self._outbox = self._outbox, []
        exiting = self._stopping and not (self._drain and self._live)
        if exiting:
          emit += [self._retire(live, FinishReason.CANCELLED, None, b"", None)
                   for live in list(self._live.values())]
      self._send(emit)
      if exiting:
        return
      try:
        self._step()
      except Exception as e:  # a bug here must not leave callers waiting forever
        logger.exception("generation loop failed; failing every live request")
        with self._cv:
          self._stopping = True
          emit = [self._retire(live, FinishReason.ERROR, ServingError(
              Code.INTERNAL, f"generation loop failed: {type(e).__name__}: {e}"), b"", None)
                  for live in list(self._live.values())]
        self._send(emit)

  def _step(self) -> None:
    if self._chunked:
      return self._step_chunked()
    with self._cv:
      batches = self._sched.schedule_prefill()
      now = self._clock()
      prefills = [(batch, self._prefill_inputs(batch, now),
                   [self._sched.get(r.seq_id) for r in batch.rows], self._want_lp(batch.rows))
                  for batch in batches]
    for batch, inputs, seqs, want in prefills:
      tokens = self._execute(lambda: self.engine.prefill(bucket=batch.bucket, **inputs))
      if tokens is None:
        return
      lp = self.engine.logprobs() if want else None
      self._apply(batch.rows, seqs, tokens, range(len(batch.rows)), lp)
    with self._cv:
      dec = self._sched.schedule_decode()
      if dec is None:
        return
      inputs = self._decode_inputs(dec.rows)
      seqs = [self._sched.get(r.seq_id) for r in dec.rows]
      want = self._want_lp(dec.rows)
    tokens = self._execute(lambda: self.engine.decode(**inputs))
    if tokens is not None:
      lp = self.engine.logprobs() if want else None
      self._apply(dec.rows, seqs, tokens, [r.slot for r in dec.rows], lp)

  def _want_lp(self, rows: tuple[PrefillRow | DecodeRow | ChunkRow, ...]) -> bool:
    """Whether a row asked for logprobs (only then are they copied off the device)."""
    return any(self._live[r.seq_id].sampling.logprobs is not None for r in rows)

  def _execute(self, call: Callable[[], np.ndarray]) -> np.ndarray | None:
    """Runs an engine call; on failure fails every running request (the cache is gone)."""
    try:
      return call()
    except Exception as e:  # the engine may raise anything; requests get INTERNAL
      logger.exception("engine call failed; failing the running requests")
      err = ServingError(Code.INTERNAL, f"engine failed: {type(e).__name__}: {e}")
      with self._cv:
        self._counters["engine_failures"] += 1
        emit = [self._retire(self._live[rid], FinishReason.ERROR, err, b"", None)
                for rid in self._sched.running_ids()]
        if self._chunked:  # the reset below empties the cache the prefixes were in
          self._sched.clear_cache()
      self.engine.reset()
      if self._draft is not None:
        self._draft.reset()
      self._send(emit)
      return None

  def _apply(self, rows: tuple[PrefillRow | DecodeRow | ChunkRow, ...], seqs: list[Seq | None],
             tokens: np.ndarray, picks: Sequence[int], lp: StepLogprobs | None) -> None:
    """Hands each row's sampled token (`tokens[picks[i]]`) to its request (unless it was
    cancelled meanwhile)."""
    emit: _Emit = []
    with self._cv:
      now = self._clock()
      for row, seq, pick in zip(rows, seqs, picks):
        if seq is None or self._sched.get(row.seq_id) is not seq:
          continue  # cancelled while the step ran
        live = self._live[row.seq_id]
        extra = ({} if lp is None or live.sampling.logprobs is None
                 else lp.event_fields(pick, live.sampling.logprobs))
        emit.append(self._on_token(live, int(tokens[pick]), now, extra))
    self._send(emit)

  def _on_token(self, live: _Live, token: int, now: float,
                extra: dict[str, Any]) -> tuple[_Live, GenerationEvent]:
    """Records a token; returns its event (the final one if the request ends here); `extra`
    holds the token's logprob fields when the request asked for them."""
    seq = self._sched.get(live.request_id)
    index = seq.num_generated
    at_limit = self._sched.append_token(live.request_id, token)
    self._counters["tokens_generated"] += 1
    live.first = now if live.first is None else live.first
    live.last = now
    if token == self.engine.spec.eos_id and not live.sampling.ignore_eos:
      return self._retire(live, FinishReason.STOP, None, live.stop.flush(), token, extra)
    piece, stopped = live.stop.feed(self._codec.piece(token))
    if stopped:
      return self._retire(live, FinishReason.STOP, None, piece, token, extra)
    if at_limit:
      return self._retire(live, FinishReason.LENGTH, None, piece + live.stop.flush(), token,
                          extra)
    return live, GenerationEvent(live.request_id, index, token, piece, live.utf8.decode(piece),
                                 **extra)

  def _retire(self, live: _Live, reason: FinishReason, error: ServingError | None, piece: bytes,
              token: int | None, extra: dict[str, Any] | None = None
              ) -> tuple[_Live, GenerationEvent]:
    """Frees the request's slot and pages and builds its final event (caller holds the lock)."""
    seq = self._sched.get(live.request_id)
    generated = seq.num_generated if seq is not None else 0
    preemptions = seq.preemptions if seq is not None else 0
    self._sched.finish(live.request_id)
    del self._live[live.request_id]
    c, now = self._counters, self._clock()
    key = {FinishReason.STOP: "requests_finished_stop", FinishReason.LENGTH:
           "requests_finished_length", FinishReason.CANCELLED: "requests_cancelled",
           FinishReason.ERROR: "requests_failed"}[reason]
    c[key] += 1
    ttft = None if live.first is None else live.first - live.submitted
    tpot = (live.last - live.first) / (generated - 1) if generated > 1 else None
    queue = None if live.admitted is None else live.admitted - live.submitted
    for name, value in (("ttft", ttft), ("tpot", tpot), ("queue", queue)):
      if value is not None:
        c[f"{name}_seconds_sum"] += value
        c[f"{name}_count"] += 1
    metrics = RequestMetrics(live.prompt_len, generated, queue, ttft, tpot,
                             now - live.submitted, preemptions)
    index = generated - 1 if token is not None else generated
    return live, GenerationEvent(live.request_id, index, token, piece,
                                 live.utf8.decode(piece, final=True), True, reason, error, metrics,
                                 **(extra or {}))

  def _send(self, emit: _Emit) -> None:
    for live, event in emit:
      try:
        live.on_event(event)
      except Exception:  # a broken callback ends its own request, nothing else
        logger.exception("on_event of %s raised; cancelling it", live.request_id)
        if not event.finished:
          self.cancel(live.request_id)
