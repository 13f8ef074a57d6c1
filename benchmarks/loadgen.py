"""A lean closed- or open-loop gRPC load generator for ModelInfer (pre-serialized requests).

Each worker process runs an asyncio gRPC client that keeps `concurrency` requests in
flight (closed loop) or sends at a fixed rate (open loop), reusing one serialized
request so the generator itself costs as little CPU as possible. Used by
benchmarks/serving.py and benchmarks/overload.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import time
from typing import Callable, Sequence

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@dataclasses.dataclass(frozen=True, slots=True)
class LoadResult:
  """What one load run measured: latencies of successful requests, and of failed ones by code."""

  seconds: float
  ok: int
  errors: dict[str, int]
  latencies_s: np.ndarray
  rows_per_request: int
  error_latencies_s: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def rps(self) -> float:
    return self.ok / self.seconds

  @property
  def rows_per_s(self) -> float:
    return self.ok * self.rows_per_request / self.seconds

  def pct_ms(self, q: float) -> float:
    return float(np.percentile(self.latencies_s, q) * 1e3) if len(self.latencies_s) else float("nan")


def build_request(model: str, inputs: dict[str, np.ndarray], *, params: dict | None = None) -> bytes:
  """Serializes a ModelInferRequest with raw_input_contents."""
  from bundle import triton_datatype
  from serving.frontend.protocol import grpc_service_pb2 as pb

  req = pb.ModelInferRequest(model_name=model)
  for name, arr in inputs.items():
    req.inputs.add(name=name, datatype=triton_datatype(arr.dtype), shape=list(arr.shape))
    req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
  for k, v in (params or {}).items():
    if isinstance(v, bool):
      req.parameters[k].bool_param = v
    elif isinstance(v, int):
      req.parameters[k].int64_param = v
    else:
      req.parameters[k].string_param = str(v)
  return req.SerializeToString()


async def _run_async(address: str, payload: bytes, concurrency: int, duration: float,
                     rate: float | None, timeout: float | None) -> tuple[int, dict, list, dict]:
  import grpc

  async with grpc.aio.insecure_channel(address, options=[
      ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)
  ]) as ch:
    call = ch.unary_unary(METHOD)  # bytes in, bytes out: no client-side (de)serialization
    ok, errors, lat, err_lat = 0, {}, [], {}
    end = time.perf_counter() + duration

    async def one() -> None:
      nonlocal ok
      t0 = time.perf_counter()
      try:
        await call(payload, timeout=timeout)
        lat.append(time.perf_counter() - t0)
        ok += 1
      except grpc.aio.AioRpcError as e:
        errors[e.code().name] = errors.get(e.code().name, 0) + 1
        err_lat.setdefault(e.code().name, []).append(time.perf_counter() - t0)

    if rate is None:
      async def loop() -> None:
        while time.perf_counter() < end:
          await one()
      await asyncio.gather(*(loop() for _ in range(concurrency)))
    else:
      tasks, interval, nxt = set(), 1.0 / rate, time.perf_counter()
      while nxt < end:
        now = time.perf_counter()
        if now < nxt:
          await asyncio.sleep(nxt - now)
        t = asyncio.ensure_future(one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        nxt += interval
      if tasks:
        await asyncio.wait(tasks, timeout=(timeout or 10) + 5)
    return ok, errors, lat, err_lat


def _worker(args) -> tuple[int, dict, list, dict]:
  return asyncio.run(_run_async(*args))


def run_load(address: str, payload: bytes, *, rows_per_request: int, concurrency: int = 16,
             processes: int = 1, duration: float = 5.0, rate: float | None = None,
             timeout: float | None = 10.0) -> LoadResult:
  """Runs `processes` workers, splitting concurrency (closed loop) or rate (open loop)."""
  per_c = [concurrency // processes + (1 if i < concurrency % processes else 0)
           for i in range(processes)]
  args = [(address, payload, max(c, 1), duration, None if rate is None else rate / processes,
           timeout) for c in per_c]
  t0 = time.perf_counter()
  if processes == 1:
    results = [_worker(args[0])]
  else:
    with mp.get_context("spawn").Pool(processes) as pool:
      results = pool.map(_worker, args)
  seconds = max(time.perf_counter() - t0, duration)
  seconds = duration  # measured window; start-up of workers is excluded by design
  ok = sum(r[0] for r in results)
  errors: dict[str, int] = {}
  for r in results:
    for k, v in r[1].items():
      errors[k] = errors.get(k, 0) + v
  lat = np.array([x for r in results for x in r[2]])
  err_lat = {code: np.array([x for r in results for x in r[3].get(code, ())]) for code in errors}
  return LoadResult(seconds, ok, errors, lat, rows_per_request, err_lat)


def saturate(run: Callable[[int], LoadResult], concurrencies: Sequence[int]
             ) -> tuple[int, LoadResult]:
  """The saturated closed-loop point, (concurrency, its result): `run(c)` at each concurrency
  in order; a larger one counts only when it beats the best rate by 1% (else only its queueing
  grows), and the sweep stops once a rate falls 5% below the best. Like perf_analyzer's
  concurrency sweep: a server batching up to 1024 rows on two instances saturates only with
  many requests in flight."""
  best: tuple[int, LoadResult] | None = None
  for c in concurrencies:
    r = run(c)
    if best is None or r.rps > 1.01 * best[1].rps:
      best = (c, r)
    elif r.rps < 0.95 * best[1].rps:
      break
  if best is None:
    raise ValueError("saturate needs at least one concurrency")
  return best


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A plain fixed-width table."""
  cells = [[str(h) for h in headers]] + [[f"{c:.3g}" if isinstance(c, float) else str(c)
                                          for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
