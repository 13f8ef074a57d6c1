"""A flooding tenant (benchmarks/tenant_isolation.py, the isolation test): `python flooder.py ADDRESS TOKEN REQUEST_HEX N`
keeps N ModelInfer calls in flight (grpc.aio, one pre-serialized request) while flooding.
stdin commands, each acknowledged with a line "ack": "go" (flood), "stop" (pause), anything else
ends it; it then prints the outcome counts as JSON, e.g. {"OK": 120, "RESOURCE_EXHAUSTED": 9000}."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import threading

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def main(address: str, token: str, request: bytes, n: int) -> dict[str, int]:
  loop = asyncio.get_running_loop()
  go, done = asyncio.Event(), asyncio.Event()
  counts: collections.Counter[str] = collections.Counter()
  md = (("authorization", f"Bearer {token}"),)

  def control() -> None:
    for line in sys.stdin:
      cmd = line.strip()
      loop.call_soon_threadsafe({"go": go.set, "stop": go.clear}.get(cmd, done.set))
      print("ack", flush=True)
      if cmd not in ("go", "stop"):
        return

  async with grpc.aio.insecure_channel(address) as ch:
    call = ch.unary_unary(METHOD)  # bytes in, bytes out

    async def worker() -> None:
      while not done.is_set():
        await go.wait()
        try:
          await call(request, metadata=md, timeout=10)
          counts["OK"] += 1
        except grpc.aio.AioRpcError as e:
          counts[e.code().name] += 1

    threading.Thread(target=control, daemon=True).start()
    workers = [asyncio.create_task(worker()) for _ in range(n)]
    await done.wait()
    go.set()  # release the paused workers so they see `done`
    await asyncio.gather(*workers)
  return dict(counts)


if __name__ == "__main__":
  result = asyncio.run(main(sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), int(sys.argv[4])))
  print(json.dumps(result), flush=True)
