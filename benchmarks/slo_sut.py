"""MLPerf LoadGen driving `xlaserve serve` over gRPC: the system under test sends one ModelInfer
per query sample and completes the sample when the answer (or an error) arrives. Three clients:
`InProcessSut`, a C++ gRPC client as an extension in this process (benchmarks/native_sut.cc:
LoadGen's issue thread sends, one C++ thread completes); `NativeSut`, the C++ load generator in
its SUT mode as a child process (ids in over a pipe, answers back: two more thread wake-ups per
query); and `GrpcSut`, a grpc.aio client on its own event loop thread (~100 us of Python per
query, which on 2 cores the server loses). Each also has a closed-loop mode with the same client
code, for the saturation figure the LoadGen runs are compared with."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import pathlib
import re
import resource
import struct
import subprocess
import tempfile
import threading
import time

import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"
SAMPLES = 1024  # LoadGen's query sample library: every sample is the same request


class Sut:
  """What every system under test offers LoadGen: `send` (ids) and the issue callback."""

  def send(self, sample_ids: list[int]) -> None:
    raise NotImplementedError

  def issue_callback(self):
    """LoadGen's issue callback: (ids, indices) -> None."""
    return lambda ids, _indices: self.send(ids)


class GrpcSut(Sut):
  """One channel on a private event loop; `send` may be called from any thread."""

  def __init__(self, address: str, payload: bytes):
    self.address, self.payload = address, payload
    self.loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
    self.records: list[tuple[float, str]] = []  # (seconds, "OK" or the gRPC code name)
    self.on_done = None  # (sample id) -> None, set by the LoadGen run

  def __enter__(self) -> GrpcSut:
    import grpc

    self._thread.start()
    async def connect():
      self.channel = grpc.aio.insecure_channel(self.address)
      self.call = self.channel.unary_unary(METHOD)
    asyncio.run_coroutine_threadsafe(connect(), self.loop).result()
    return self

  def __exit__(self, *exc) -> None:
    asyncio.run_coroutine_threadsafe(self.channel.close(), self.loop).result()
    self.loop.call_soon_threadsafe(self.loop.stop)
    self._thread.join(10)

  async def _one(self, sample_id: int | None) -> None:
    import grpc

    t0 = time.perf_counter()
    try:
      await self.call(self.payload, timeout=60)
      code = "OK"
    except grpc.aio.AioRpcError as e:
      code = e.code().name
    self.records.append((time.perf_counter() - t0, code))
    if sample_id is not None and self.on_done is not None:
      self.on_done([sample_id])

  def send(self, sample_ids: list[int]) -> None:
    def start():
      for i in sample_ids:
        self.loop.create_task(self._one(i))
    self.loop.call_soon_threadsafe(start)

  def closed_loop(self, concurrency: int, seconds: float) -> float:
    """Requests/s answered OK with `concurrency` requests always in flight for `seconds`."""
    async def run() -> int:
      end = time.perf_counter() + seconds
      async def worker():
        while time.perf_counter() < end:
          await self._one(None)
      t0 = time.perf_counter()
      await asyncio.gather(*(worker() for _ in range(concurrency)))
      return sum(code == "OK" for _, code in self.records) / (time.perf_counter() - t0)
    self.records = []
    return asyncio.run_coroutine_threadsafe(run(), self.loop).result()


_RECORD = struct.Struct("<Qqq")  # native_loadgen.cc SutRecord: id, status code, microseconds


def _code_names() -> dict[int, str]:
  import grpc

  return {**{c.value[0]: c.name for c in grpc.StatusCode}, 100: "EMPTY_RESPONSE"}


class _RecordSut(Sut):
  """What the C++ clients share: answers arrive as packed SutRecords (`_take`), and the closed
  loop and LoadGen's callback go through the subclass's `send`."""

  def __init__(self, address: str, payload, channels: int = 1):
    self.address, self.payload, self.channels = address, payload, channels
    self.records: list[tuple[float, str]] = []
    self.on_done = None  # (sample ids) -> None, set by the LoadGen run
    self._names = _code_names()

  def _take(self, records: bytes) -> None:
    """Books whole SutRecords and completes their samples."""
    ids = []
    for i, code, micros in _RECORD.iter_unpack(records):  # in an open loop mostly one: no numpy
      self.records.append((micros * 1e-6, self._names.get(code, "UNKNOWN")))
      ids.append(i)
    if self.on_done is not None and ids:
      self.on_done(ids)

  def closed_loop(self, concurrency: int, seconds: float) -> float:
    """Requests/s answered OK with `concurrency` requests always in flight for `seconds`, through
    the same path as the LoadGen runs (`send`, answers back through `_take`), so the saturation
    figure and the LoadGen figures pay the same client costs."""
    self.records = []
    t0 = time.perf_counter()
    end, state, over = t0 + seconds, {"left": concurrency}, threading.Event()

    def again(ids: list[int]) -> None:  # on the thread that delivers answers
      now = time.perf_counter()
      if now < end:
        self.send(ids)
        return
      if "ok" not in state:
        state["ok"] = sum(code == "OK" for _, code in self.records)
        state["t"] = now
      state["left"] -= len(ids)
      if state["left"] == 0:
        over.set()

    self.on_done = again
    self.send(list(range(concurrency)))
    finished = over.wait(seconds + 60)
    self.on_done = None
    if not finished:
      raise RuntimeError("closed loop: answers stopped coming (is the server up?)")
    return state["ok"] / (state["t"] - t0)


class NativeSut(_RecordSut):
  """benchmarks/native_loadgen.cc in SUT mode, as a child process; same interface as GrpcSut.
  With an HttpRequest for `payload` (benchmarks/native_http_loadgen.py) and the server's HTTP
  address, native_http_loadgen.cc instead: the same pipe protocol, one epoll thread, KServe v2
  binary-tensor requests over keep-alive connections."""

  def __init__(self, address: str, payload, channels: int = 1):
    super().__init__(address, payload, channels)
    self._tmp = tempfile.TemporaryDirectory(prefix="native_sut_")

  def __enter__(self) -> NativeSut:
    from benchmarks import native_http_loadgen, native_loadgen

    request = pathlib.Path(self._tmp.name, "request.bin")
    if isinstance(self.payload, native_http_loadgen.HttpRequest):
      request.write_bytes(self.payload.body)
      cmd = native_http_loadgen.command(self.address, self.payload, request)
    else:
      request.write_bytes(self.payload)
      cmd = [str(native_loadgen.build()), "--address", self.address, "--request", str(request),
             "--channels", str(self.channels)]
    self._proc = subprocess.Popen(cmd + ["--timeout", "60", "--sut", "1"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    return self

  def __exit__(self, *exc) -> None:
    self._proc.stdin.close()
    self._proc.wait(90)
    self._reader.join(10)
    self._tmp.cleanup()

  def _read(self) -> None:
    """Completes samples as their records arrive (os.read releases the GIL while it waits)."""
    fd, rest = self._proc.stdout.fileno(), b""
    while chunk := os.read(fd, 1 << 16):
      rest += chunk
      whole = len(rest) // _RECORD.size * _RECORD.size
      self._take(rest[:whole])
      rest = rest[whole:]

  def send(self, sample_ids: list[int]) -> None:
    os.write(self._proc.stdin.fileno(), struct.pack(f"<{len(sample_ids)}Q", *sample_ids))


class InProcessSut(_RecordSut):
  """benchmarks/native_sut.cc: the same gRPC client, in this process (same interface). LoadGen's
  issue thread sends itself (the GIL released) and one C++ thread hands the answers back, so a
  query crosses no pipe and wakes no extra thread: ~10-15 us less of the shared cores per query
  in an open loop than NativeSut's child process. Its CPU counts as LoadGen's (CpuMeter)."""

  def __init__(self, address: str, payload: bytes, channels: int = 1, timeout_s: float = 60.0):
    super().__init__(address, payload, channels)
    self.timeout_s = timeout_s  # calls in flight longer are cancelled (checked once a second)

  def __enter__(self) -> InProcessSut:
    from benchmarks import native_sut

    self._module = native_sut.build()
    self._handle = self._module.open(self.address, self.payload, self.channels, self.timeout_s,
                                     self._take)
    return self

  def __exit__(self, *exc) -> None:
    self._module.close(self._handle)

  def send(self, sample_ids: list[int]) -> None:
    self._module.send(self._handle, sample_ids)

  def issue_callback(self):
    """LoadGen's issue callback, (ids, indices) -> None, with no Python frame per call."""
    return functools.partial(self._module.send, self._handle)


def _summary(path: pathlib.Path) -> dict:
  """LoadGen's verdict, its p99 (from each query's scheduled issue time) and early stopping."""
  text = path.read_text()
  valid = re.search(r"Result is\s*:\s*(\w+)", text)
  p99 = re.search(r"99\.00 percentile latency \(ns\)\s*:\s*(\d+)", text)
  early = re.search(r"Early stopping satisfied\s*:\s*(\w+)", text)
  return {"loadgen": valid.group(1) if valid else "?",
          "loadgen_p99_ms": int(p99.group(1)) / 1e6 if p99 else float("nan"),
          "early_stopping": early.group(1) if early else "?"}


class CpuMeter:
  """CPU seconds of the three parties sharing the cores: the server (its pid), the SUT's client
  process (NativeSut's child; a GrpcSut runs in this process) and this process (LoadGen and the
  SUT's Python), so a run can say what each cost per query."""

  def __init__(self, sut: Sut, server_pid: int | None):
    import psutil

    self._server = psutil.Process(server_pid) if server_pid else None
    child = getattr(sut, "_proc", None)
    self._client = psutil.Process(child.pid) if child is not None else None

  def read(self) -> dict[str, float]:
    def cpu(p) -> float:
      t = p.cpu_times()
      return t.user + t.system

    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"server": cpu(self._server) if self._server else float("nan"),
            "client": cpu(self._client) if self._client else 0.0,
            "loadgen": me.ru_utime + me.ru_stime}

  @staticmethod
  def per_query(before: dict, after: dict, queries: int) -> dict[str, float]:
    """Microseconds of CPU per query for each party between two reads."""
    return {k: (after[k] - before[k]) / max(queries, 1) * 1e6 for k in before}


def loadgen_run(sut: Sut, qps: float, bound_ms: float, seconds: float,
                outdir: pathlib.Path, meter: CpuMeter | None = None) -> dict:
  """One LoadGen Server-scenario run at `qps` (Poisson arrivals) with a p99 bound; VALID only
  when LoadGen says so and at most 1% of the queries were late or failed. With a `meter`, the
  result's `cpu_us` is each party's CPU per query. Queries already due when LoadGen's issue
  thread wakes go in one call (each still timed from its own scheduled arrival)."""
  import mlperf_loadgen as lg

  outdir.mkdir(parents=True, exist_ok=True)
  settings = lg.TestSettings()
  settings.scenario = lg.TestScenario.Server
  settings.mode = lg.TestMode.PerformanceOnly
  settings.server_target_qps = qps
  settings.server_target_latency_ns = int(bound_ms * 1e6)
  settings.server_target_latency_percentile = 0.99
  settings.server_coalesce_queries = True
  settings.min_duration_ms = int(seconds * 1000)
  settings.max_duration_ms = int(seconds * 4000)
  settings.min_query_count = max(1, int(qps * seconds))
  log = lg.LogSettings()
  log.log_output.outdir = str(outdir)
  log.log_output.copy_summary_to_stdout = False
  log.enable_trace = False

  pool: list = []  # responses reused (LoadGen copies them): no pybind object per query

  def done(sample_ids: list[int]) -> None:
    while len(pool) < len(sample_ids):
      pool.append(lg.QuerySampleResponse(0, 0, 0))
    responses = pool[:len(sample_ids)]
    for r, i in zip(responses, sample_ids):
      r.id = i
    lg.QuerySamplesComplete(responses)

  sut.records, sut.on_done = [], done
  # The "fast" SUT hands over plain ids, not a QuerySample object per query.
  handle = lg.ConstructFastSUT(sut.issue_callback(), lambda: None)
  qsl = lg.ConstructQSL(SAMPLES, SAMPLES, lambda _: None, lambda _: None)
  gc.collect()  # the client's own collector pauses would count against the server
  gc.disable()
  before = meter.read() if meter else None
  try:
    lg.StartTestWithLogSettings(handle, qsl, settings, log)
  finally:
    gc.enable()
    lg.DestroyQSL(qsl)
    lg.DestroyFastSUT(handle)
  after = meter.read() if meter else None
  sut.on_done = None
  lat = np.array([s if code == "OK" else np.inf for s, code in sut.records])
  failed = sum(1 for _, code in sut.records if code != "OK")
  missed = float(np.mean(lat > bound_ms / 1e3)) if len(lat) else 1.0
  out = _summary(outdir / "mlperf_log_summary.txt")
  # The p99 reported: LoadGen's, unless failures alone pass 1% (each counts as a miss).
  p99 = out["loadgen_p99_ms"] if failed <= 0.01 * max(len(lat), 1) else 1e4
  out.update(target_qps=qps, queries=len(lat), failed=failed, missed_share=missed, p99_ms=p99,
             valid=out["loadgen"] == "VALID" and missed <= 0.01)
  if meter:
    out["cpu_us"] = CpuMeter.per_query(before, after, len(lat))
  return out
