"""Helpers for generation tests: collect a request's events and wait for its end."""

from __future__ import annotations

import threading

from serving.generation.request import FinishReason, GenerationEvent


class Stream:
  """on_event target that records one request's events (called from the engine thread)."""

  def __init__(self):
    self.events: list[GenerationEvent] = []
    self.done = threading.Event()

  def __call__(self, event: GenerationEvent) -> None:
    if self.done.is_set():
      raise AssertionError(f"event after the final one: {event}")
    self.events.append(event)
    if event.finished:
      self.done.set()

  def wait(self, timeout: float = 30.0) -> GenerationEvent:
    if not self.done.wait(timeout):
      raise AssertionError(f"no final event within {timeout}s; got {self.events}")
    return self.events[-1]

  @property
  def tokens(self) -> list[int]:
    return [e.token_id for e in self.events if e.token_id is not None]

  @property
  def data(self) -> bytes:
    return b"".join(e.piece for e in self.events)

  @property
  def text(self) -> str:
    return "".join(e.text for e in self.events)

  @property
  def reason(self) -> FinishReason | None:
    return self.events[-1].finish_reason if self.done.is_set() else None
