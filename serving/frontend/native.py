"""Python half of the native gRPC front end (serving/frontend/native/{module,wire,relay}.cc).

The C++ server owns the public port. It parses and validates ModelInfer requests for the
"fast" models published here (plain batched predict models: runners declaring fixed-shape rows) and
relays everything else to the Python servicer on an internal unix socket. A runner with a native
batch queue (`capabilities.queue`: serving/frontend/native_queue.py, serving/runners/queued.py)
gets its requests straight from C++: admission, queueing, batch assembly and the answers happen
there, and Python is entered once per batch. For any other fast runner, one feeder
thread takes parsed requests in bulk (GIL released while it waits), wraps each in the
usual InferRequest and submits it to the model's runner, so batching, deadlines,
admission and metrics are unchanged; the runner's answers go back in one call per batch.
A request the feeder cannot place (a version retired since the table was published) is
handed back to the relay, so the Python servicer answers it with its usual semantics.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Sequence

import numpy as np

from bundle import numpy_dtype
from serving.frontend import codec
from serving.frontend.servicer import GRPC_CODE, log_outcome
from serving.repository import ModelRepository, ServedVersion, State
from serving.runners import Runner
from serving.types import Code, Completion, InferRequest, ServingError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("apt-get install libgrpc++-dev rapidjson-dev pkg-config, then pip install -e ."
                " again (Debian/Ubuntu package names)")
_CODE = {c: GRPC_CODE[c].value[0] for c in Code}


def load_extension() -> tuple[Any, str]:
  """The compiled `serving.frontend._native` module (or None) and, when missing, why."""
  try:
    from serving.frontend import _native
  except ImportError as e:
    return None, f"the native front end is not built ({e}); {INSTALL_HINT}"
  return _native, ""


def _bytes_at(name: str, buf: Any, offset: int, count: int) -> np.ndarray:
  """A per-request BYTES input (validated in C++) from the request's bytes at `offset`."""
  arr = np.empty(count, dtype=object)
  arr[:] = codec.bytes_elements(name, memoryview(buf)[offset:], count, exact=False)
  return arr


class _Slot:
  """A published (model, version) and what the feeder needs to build its requests."""

  __slots__ = ("rec", "runner", "version_key", "inputs")

  def __init__(self, rec: ServedVersion, version_key: str, runner: Runner):
    self.rec = rec
    self.runner = runner  # the C++ side validated against this runner's input specs
    self.version_key = version_key
    # (name, dtype, values per row, row shape, 1 for a context input (one row) else 0)
    self.inputs = tuple((t.name, numpy_dtype(t.dtype), int(np.prod(t.shape[1:])),
                         tuple(t.shape[1:]), int(t.per_request)) for t in runner.inputs)


def _fast_runner(rec: ServedVersion) -> Runner | None:
  """The runner if the C++ front end can serve it: one that declares plain fixed-shape rows
  (numeric tensors, fixed dimensions after the batch dimension, no parameters; context inputs
  of one row per request beside them)."""
  runner = rec.runner
  if rec.state is not State.READY or runner is None or not runner.capabilities.fixed_rows:
    return None
  return runner


def _entry_specs(specs: Sequence) -> list[tuple[str, str, list[int], int]]:
  return [(t.name, t.datatype, list(t.shape), numpy_dtype(t.dtype).itemsize)
          for t in specs]


class NativeFrontend:
  """Starts the C++ server, keeps its model table current and feeds its requests to runners;
  the completion sink of the requests it accepted (`sink_token` = (call id, slot))."""

  def __init__(self, native: Any, repository: ModelRepository, *, backend: str,
               limits: codec.Limits, max_message_bytes: int, auth_token: str | None,
               id_prefix: str, threads: int = 1, accept_backlog: int = 1024,
               read_coalesce: bool = False,
               tls: tuple[str, str, float, str | None] | None = None, tenants: Any = None):
    self.repo = repository
    self._fe = native.Frontend(backend, max_message_bytes, limits.max_rows,
                               limits.max_tensor_bytes, auth_token or "", id_prefix, threads)
    self._fe.set_accept_backlog(accept_backlog)
    self._fe.set_read_coalesce(read_coalesce)  # with a latency target (native/cq_poll.cc)
    if tls is not None:  # (chain file, key file, seconds between re-reads, client CA or None)
      self._fe.set_tls(tls[0], tls[1], max(1, round(tls[2])), tls[3] or "")
    if tenants is not None:  # a _native.Tenants: the fast paths charge its buckets
      self._fe.set_tenants(tenants)
    self._slots: dict[int, _Slot] = {}
    self._slot_of: dict[tuple[int, str], int] = {}  # (id(rec), version key) -> slot
    self._next_slot = 1
    self._threads = threads
    self._lock = threading.Lock()
    self._feeder = threading.Thread(target=self._feed, name="native-feeder", daemon=True)

  def start(self, address: str) -> int:
    """Listens on `address`; returns the port (0 if it could not bind)."""
    port = self._fe.start(address)
    if port:
      self._feeder.start()
    return port

  def start_http(self, host: str, port: int, backend: str, *, read_timeout_s: float,
                 idle_timeout_s: float, max_body_bytes: int) -> int:
    """Serves HTTP on host:port in C++ (binary-tensor inference of natively queued models),
    relaying every other request to the Python HTTP server on the unix socket `backend`;
    returns the port. Raises OSError when it cannot listen."""
    try:
      return self._fe.start_http(host, port, backend, read_timeout_s, idle_timeout_s,
                                 max_body_bytes, self._threads)
    except RuntimeError as e:
      raise OSError(str(e)) from None

  def refresh(self) -> None:
    """Publishes the fast models (default and explicit versions); thread-safe. A request for
    a model not published is relayed to the Python servicer."""
    with self._lock:
      entries, slots, slot_of = [], {}, {}
      for rec in self.repo.records():
        runner = _fast_runner(rec)
        if runner is None:
          continue
        keys = [str(rec.version)]
        if self.repo.default_version(rec.name) is rec and not self.repo.traffic.routed(rec.name):
          keys.append("")  # a split or shadow: its own unversioned entry (below)
        for key in keys:
          ident = (id(rec), key)
          slot = self._slot_of.get(ident)
          old = self._slots.get(slot) if slot is not None else None
          if old is None or old.rec is not rec or old.runner is not runner:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
          slot_of[ident] = slot
          slots[slot] = _Slot(rec, key, runner)
          entries.append((rec.name, key, slot, str(rec.version),
                          _entry_specs(runner.inputs), _entry_specs(runner.outputs),
                          rec.config.default_timeout_us or 0, runner.capabilities.queue))
      entries += [e for name in {r.name for r in self.repo.records()}
                  if (e := self._split_entry(name)) is not None]
      # A slot no longer published stays while its version still runs: the C++ side may have
      # queued requests for it. Requests for a slot that is gone are relayed to Python.
      self._slots = slots | {s: v for s, v in self._slots.items()
                             if s not in slots and v.rec.runner is v.runner}
      self._slot_of = slot_of
      self._fe.set_models(entries)

  def trace_secret(self) -> str:
    """The secret the HTTP relay's trace marks carry (Python trusts a mark only with it)."""
    return self._fe.trace_secret()

  def set_tracing(self, rate: float) -> None:
    """Tracing on: C++ takes the head decision of each ModelInfer (a client's sampled
    traceparent, else a draw against `rate`) and relays the sampled ones to Python, marked."""
    self._fe.set_tracing(True, rate)

  def _split_entry(self, name: str) -> tuple | None:
    """The unversioned entry of a model with a canary split or shadow, which the C++ side
    routes (split.cc: the same points and weights as serving/repository/traffic.py); None when
    the model has neither, or a version it may pick is not served natively (then Python routes
    every unversioned request)."""
    traffic, shadow = self.repo.traffic.get(name)
    if traffic is None and shadow is None:
      return None
    ready = {r.version: r for r in self.repo.versions_of(name)
             if r.state is State.READY and r.runner is not None}
    if traffic is not None:
      live = [(v, w) for v, w in traffic.weights if w > 0 and v in ready]
    else:
      default = self.repo.default_version(name)
      live = [(default.version, 1.0)] if default is not None else []
    if not live or any(_fast_runner(ready[v]) is None for v, _ in live):
      return None
    bounds = list(itertools.accumulate(float(w) for _, w in live))
    split = ((traffic.sticky_parameter or "") if traffic is not None else "", bounds,
             [str(v) for v, _ in live], shadow.fraction if shadow is not None else 0.0)
    return (name, "", -1, "", [], [], 0, None, split)

  def routed_counts(self) -> dict[tuple[str, int], int]:
    """(model, version) -> unversioned requests the C++ split sent there."""
    return {(m, int(v)): n for (m, v), n in self._fe.routed_counts().items()}

  def set_accepting(self, accepting: bool) -> None:
    """False: every ModelInfer goes to the Python servicer (which answers UNAVAILABLE)."""
    self._fe.set_accepting(accepting)

  def inflight(self) -> int:
    return self._fe.inflight()

  def stats(self) -> dict[str, int]:
    """Counts: fast (served natively), relayed (sent to Python), forwarded (handed back)."""
    return dict(self._fe.stats())

  async def wait_idle(self, timeout: float) -> bool:
    """Waits until no native request is in flight (graceful shutdown)."""
    import asyncio
    end = time.perf_counter() + timeout
    while self._fe.inflight() > 0:
      if time.perf_counter() > end:
        return False
      await asyncio.sleep(0.005)
    return True

  def stop(self, grace_s: float = 1.0) -> None:
    """Stops the C++ server (calls still open after `grace_s` are cancelled) and the feeder."""
    self._fe.stop(grace_s)
    if self._feeder.is_alive():
      self._feeder.join(5.0)

  # -- runner -> C++ -------------------------------------------------------------------------

  def complete(self, completions: list[Completion]) -> None:
    """Runner thread: answers native requests, one call into C++ per batch. Never raises (the
    runner thread must survive); a failure here fails the batch's requests with INTERNAL."""
    try:
      self._fe.complete([(req.sink_token[0], out, 0, "") if err is None
                         else (req.sink_token[0], None, _CODE[err.code], err.message)
                         for req, out, err in completions])
      slots = self._slots
      for req, _, err in completions:
        slot = slots.get(req.sink_token[1])
        log_outcome(slot.rec.name if slot else "", slot.version_key if slot else "",
                    req.request_id, err, req.arrival)
    except Exception as e:
      logger.exception("native front end: answering %d requests failed", len(completions))
      try:  # calls already answered are ignored by the C++ side
        self._fe.complete([(req.sink_token[0], None, _CODE[Code.INTERNAL], f"front end failed: {e}")
                           for req, _, _ in completions])
      except Exception:
        logger.exception("native front end: failing the requests failed too")

  # -- C++ -> runners ------------------------------------------------------------------------

  def _feed(self) -> None:
    fe = self._fe
    while True:
      try:
        batch = fe.take(512, 0.5)
      except Exception:  # never leave requests behind silently
        logger.exception("native front end: taking requests failed")
        continue
      if batch is None:
        return
      if batch:
        try:
          self._submit(batch)
        except Exception:
          logger.exception("native front end: submitting requests failed")

  def _submit(self, batch: list) -> None:
    slots = self._slots
    relay, refused, broken = [], [], []
    frombuffer = np.frombuffer
    for call, slot_id, rows, buf, offsets, arrival, deadline, priority, request_id in batch:
      try:
        slot = slots.get(slot_id)
        runner = slot.runner if slot is not None else None
        if runner is None or slot.rec.runner is not runner:  # unloaded or reloaded since
          relay.append(call)
          continue
        inputs = {name: (frombuffer(buf, dt, (one or rows) * n, off) if dt != object
                         else _bytes_at(name, buf, off, n)).reshape(((one or rows), *shape))
                  for (name, dt, n, shape, one), off in zip(slot.inputs, offsets)}
        req = InferRequest(inputs, rows, self, arrival, deadline, priority, request_id,
                           sink_token=(call, slot_id))
        try:
          runner.submit(req)
        except ServingError as e:
          if e.code is Code.UNAVAILABLE and (slot.rec.runner is not runner or (
              not slot.version_key and slot.rec.state is not State.READY)):
            relay.append(call)  # retired or rebuilt by a hot reload: the servicer routes it
          else:
            refused.append((req, None, e))
      except Exception as e:  # a bug must fail its request, never leave it unanswered
        logger.exception("native front end: request %s failed before queueing", request_id)
        broken.append((call, None, _CODE[Code.INTERNAL], f"front end failed: {e}"))
    if relay:
      self._fe.forward(relay)
    if refused:
      self.complete(refused)
    if broken:
      self._fe.complete(broken)
