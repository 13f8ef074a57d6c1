"""The door check every batcher shares: queue bounds (rows, requests) and deadlines the queue
cannot meet, each refused at once with a message that says what to do."""

from __future__ import annotations


class Admission(Exception):
  """A request was refused at the door; the message says why (queue full, deadline unreachable)."""


def check_queue_bounds(*, queued_rows: int, queued_requests: int, rows: int,
                       max_queue_rows: int, max_queue_requests: int | None) -> None:
  """Raises Admission when `rows` more would pass `max_queue_rows`, or the queue already holds
  `max_queue_requests` requests."""
  if queued_rows + rows > max_queue_rows:
    raise Admission(
        f"queue full: {queued_rows} rows queued, {rows} more would exceed"
        f" max_queue_rows={max_queue_rows}; retry later or add capacity")
  if max_queue_requests is not None and queued_requests >= max_queue_requests:
    raise Admission(f"queue full: {max_queue_requests} requests queued (max_queue_requests);"
                    " retry later or add capacity")


def check_deadline(*, wait_s: float | None, left_s: float, headroom: float) -> None:
  """Raises Admission when the estimated wait does not fit in (1 - headroom) of the time left
  before the deadline (the rest covers delivery and the estimate's own error)."""
  if wait_s is not None and wait_s > left_s * (1.0 - headroom):
    raise Admission(
        f"overloaded: the queue ahead needs about {wait_s * 1e3:.0f} ms of the"
        f" {max(left_s, 0) * 1e3:.0f} ms left before the deadline; retry later, with a longer"
        " deadline, or add capacity")


def check_budget(*, estimate_s: float | None, budget_s: float, latency_slo_s: float | None) -> None:
  """Raises Admission when a new request's estimated finish (queue ahead plus its own batch)
  passes the model's budget: its latency target less headroom, or its queue-wait bound."""
  if estimate_s is None or estimate_s <= budget_s:
    return
  what = (f"the model's {latency_slo_s * 1e3:.0f} ms latency target" if latency_slo_s is not None
          else f"the {budget_s * 1e3:.0f} ms queue-wait bound")
  raise Admission(f"overloaded: the queue ahead needs about {estimate_s * 1e3:.0f} ms, beyond"
                  f" {what}; retry later or add capacity")
