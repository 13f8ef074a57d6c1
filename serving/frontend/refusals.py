"""Refusals held before they are answered, as the native front end holds its own
(serving/frontend/native/tenants.cc, `Frontend::Refuse`): a request over its tenant's quota until
the quota would admit it again, one with bad credentials MAX_HOLD_S, never past half the time
left before the call's deadline. A client that retries at once is then admitted, and one flooding
with a fixed number of calls in flight cannot spin the server's cores on refusals."""

from __future__ import annotations

import asyncio
import random

MAX_HOLD_S = 0.1  # native tenants.h kMaxRefusalHoldS
MIN_HOLD_S = 1e-3  # shorter: answered at once (native tenants.h kMinRefusalHoldS)


def spread(retry_s: float) -> float:
  """How long to hold an over-quota refusal the quota admits again in `retry_s` (native
  `RefusalHold`): that, plus up to as long again at random, so the calls a flood had refused
  together do not all come back at the same instant; at most MAX_HOLD_S."""
  return min(MAX_HOLD_S, retry_s * (1.0 + random.random()))


async def hold(seconds: float, time_left: float | None = None) -> None:
  """Waits `seconds` (at most MAX_HOLD_S, and half of `time_left`, the call's deadline) before a
  refusal is answered."""
  seconds = min(seconds, MAX_HOLD_S)
  if time_left is not None:
    seconds = min(seconds, time_left / 2)
  if seconds >= MIN_HOLD_S:
    await asyncio.sleep(seconds)
