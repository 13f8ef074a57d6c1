"""Wires repository, runners, gRPC servicers and metrics into one server process.

Start-up: the gRPC port opens at once (live, not ready), models load and warm up
in a worker thread, then readiness turns true. Optional start-up work (`startup`: the demo builds
its missing models there) runs beside that load and may add models as it goes (`load_model`):
each serves (ModelReady, inference) as soon as it is loaded, while the server's readiness
(ServerReady, grpc.health, HTTP /v2/health/ready) stays false until the work is done and every
model is READY, so an orchestrator routes nothing before then. Shutdown (SIGTERM/SIGINT):
readiness turns false, new requests get UNAVAILABLE, every accepted request is
answered, then the process exits 0.

Front ends: by default the native C++ server (serving/frontend/native.py) owns the public
port, serves ModelInfer of plain batched models itself and relays every other call to the
grpc.aio server, which then listens on a private unix socket (with TLS, the native server
terminates it, re-reading the certificate files every `tls_reload_s`); with
`frontend="python"` or without the compiled extension, the grpc.aio server owns the port.

HTTP/REST (KServe v2, serving/frontend/http/) runs on the same loop over the same servicer when
`http_port` >= 0. Optional: TLS (mutual with a client CA), a bearer token (serving/frontend/auth.py)
or tenants with quotas (serving/tenancy.py), and hot reload (serving/repository/reload.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import pathlib
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from serving.frontend import codec
from serving.frontend import native as native_frontend
from serving.frontend.native_queue import row_queue_factory
from serving.frontend.auth import server_credentials
from serving.frontend.grpc_service import SERVICE_NAME, add_inference_service
from serving.frontend.http import HttpConfig, HttpFrontend
from serving.frontend.protocol import grpc_service_pb2 as pb
from serving.frontend.servicer import InferenceServicer
from serving.kinds import ModelKind, standard_kinds
from serving.repository import EngineFactory, ModelRepository, RepositoryPoller
from serving.repository.auto_plan import SizeTallies
from serving.repository.budget import DeviceBudget, holding
from serving.repository.replan import AutoPlanner
from serving import tenancy
from serving.server_config import ServerConfig
from serving.telemetry.bucket_plan_metrics import BucketPlanCollector
from serving.telemetry.canary_metrics import CanaryCollector
from serving.telemetry.compile_watch import CompileCounter
from serving.telemetry.memory_metrics import ModelMemoryCollector
from serving.telemetry.metrics import Metrics
from serving.telemetry.metrics_endpoint import MetricsEndpoint
from serving.telemetry.profile import Profiler
from serving.telemetry.tracing import Tracing

logger = logging.getLogger(__name__)
class _Servicer(InferenceServicer):
  """ServerReady answers the server's readiness (`Server.ready`), as grpc.health and HTTP do."""

  def __init__(self, repository: ModelRepository, *, limits: codec.Limits,
               ready: Callable[[], bool]):
    super().__init__(repository, limits=limits)
    self._ready = ready

  async def ServerReady(self, request, context):
    return pb.ServerReadyResponse(ready=self._ready())


class Server:
  """One xlaserve process: `await run()` serves until `request_stop()` or a signal."""

  def __init__(self, config: ServerConfig, *, kinds: Mapping[str, ModelKind] | None = None,
               engine_factory: EngineFactory | None = None,
               progress: Callable[[str], None] | None = None,
               startup: Callable[[Server], None] | None = None):
    """`kinds`: manifest kind -> how to load it (the CLI passes `standard_kinds`); without it,
    the standard kinds with predict engines from `engine_factory`. `startup`: more start-up
    work, run on a worker thread beside the initial load; it may add models (`load_model`),
    which serve at once; the server turns ready only after it returns (if it raises, never)."""
    self.config = config
    self.startup = startup
    self._startup_failed = False
    self.progress = progress or (lambda msg: logger.info("%s", msg))
    self.compiles = CompileCounter().install()
    self.tracing = Tracing(config.tracing) if config.tracing.enabled else None
    self.metrics = Metrics(compile_count=lambda: self.compiles.outside_warmup,
                           tracing=self.tracing)
    self.native: native_frontend.NativeFrontend | None = None
    self._native_module, self.frontend = self._choose_frontend()
    self._socket_dir: str | None = None
    kinds = dict(kinds) if kinds is not None else standard_kinds(engine_factory)
    self.budget = (DeviceBudget(config.device_memory_budget_bytes,
                                holds=lambda label: holding(self.repository)(label))
                   if config.device_memory_budget_bytes is not None else None)
    self.tallies = SizeTallies()  # request sizes per version, for bucket_plan: auto
    self.repository = ModelRepository(
        config.model_repository, kinds={k: self.budget.guard(v.load) if self.budget else v.load
                                        for k, v in kinds.items()},
        observer_factory=self.tallies.observing(self.metrics.observer),
        compile_counter=self.compiles,
        default_config=config.default_model_config,
        row_queue=(row_queue_factory(self._native_module)
                   if self._native_module is not None and config.batch_queue == "native"
                   else None))
    self.metrics.registry.register(ModelMemoryCollector(lambda: [
        (f"{r.name}/{r.version}", r.runner) for r in self.repository.records()
        if r.runner is not None]))
    for kind, spec in kinds.items():
      if spec.metrics is not None:
        self.metrics.registry.register(spec.metrics(
            lambda kind=kind: self.repository.runners_of_kind(kind)))
    self.servicer = _Servicer(self.repository, limits=config.limits, ready=lambda: self.ready)
    self.servicer.on_repository_change = self._repository_changed
    self.servicer.stages = self.metrics  # profile captures record through it
    self.servicer.profiler = Profiler(self.metrics, pathlib.Path(
        config.profile_dir or pathlib.Path(tempfile.gettempdir()) / "xlaserve-profiles"))
    self.metrics.registry.register(CanaryCollector(self.servicer.canary.snapshot))
    self.servicer.tracing = self.tracing
    self.servicer.set_trace_rate = self.tracing.set_rate if self.tracing is not None else None
    self.gate = tenancy.install(config, self._native_module, self.servicer, self.metrics.registry)
    self.auth = tenancy.interceptor(config, self.gate, lambda: self.native)  # token or tenants
    self.poller = (RepositoryPoller(self.repository, config.repository_poll_s,
                                    progress=self.progress, on_change=self._repository_changed)
                   if config.repository_poll_s > 0 else None)
    self.planner = AutoPlanner(self.repository, self.tallies, progress=self.progress,
                               on_change=self._repository_changed)  # bucket_plan: auto
    self.metrics.registry.register(BucketPlanCollector(self.planner.snapshot))
    self.health = HealthServicer()
    self.grpc_port: int | None = None
    self.metrics_port: int | None = None
    self.http: HttpFrontend | None = None
    self.http_port: int | None = None
    self.http_frontend = "python"  # "native" once the C++ HTTP server owns the port
    self.loaded = threading.Event()
    self.load_s = 0.0
    self._stop: asyncio.Event | None = None
    self.stopping = threading.Event()  # set with _stop; start-up work reads it between steps
    self._loop: asyncio.AbstractEventLoop | None = None
    self._metrics_server = None

  def _choose_frontend(self) -> tuple[Any, str]:
    """The compiled extension (or None) and "native" or "python", saying why on a fallback."""
    cfg = self.config
    if cfg.frontend == "python":
      return None, "python"
    module, why = native_frontend.load_extension()
    if module is None:
      if cfg.frontend == "native":
        raise RuntimeError(f"--frontend native: {why}")
      logger.warning("using the Python gRPC front end: %s", why)
      self.progress(f"gRPC front end: python ({why})")
      return None, "python"
    return module, "native"

  async def _set_health(self, serving: bool) -> None:
    status = (health_pb2.HealthCheckResponse.SERVING if serving
              else health_pb2.HealthCheckResponse.NOT_SERVING)
    for svc in ("", SERVICE_NAME):
      await self.health.set(svc, status)

  @property
  def ready(self) -> bool:
    """The server's readiness: start-up (initial load and `startup` work) is over and succeeded,
    it is not shutting down, and every model serves a READY version."""
    return (self.loaded.is_set() and not self._startup_failed and not self.stopping.is_set()
            and self.servicer.accepting and self.repository.all_ready)

  def load_model(self, name: str) -> None:
    """Thread-safe: loads model `name` from the repository and publishes it to the front ends
    at once (start-up work uses it to serve each model as soon as it exists)."""
    self.repository.load(name, progress=self.progress)
    self._repository_changed()

  def _run_startup(self) -> None:
    try:
      with self.compiles.warming():  # its compiles (training, export) are start-up, not requests
        self.startup(self)
    except Exception as e:  # the models loaded so far keep serving; readiness stays false
      logger.exception("start-up work failed")
      self._startup_failed = True
      self.progress(f"start-up work failed: {type(e).__name__}: {e}; the server stays NOT ready")

  def _repository_changed(self) -> None:
    """Thread-safe: after a load or unload, republishes native models and refreshes health."""
    if self.native is not None:
      self.native.refresh()
    loop = self._loop
    if loop is None or loop.is_closed() or not self.loaded.is_set():
      return

    def refresh() -> None:
      loop.create_task(self._set_health(self.ready))
    loop.call_soon_threadsafe(refresh)

  def request_stop(self) -> None:
    """Thread-safe: begins graceful shutdown (once start-up work has seen `stopping`)."""
    self.stopping.set()
    if self._loop is not None and self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)

  async def run(self, *, install_signal_handlers: bool = True,
                on_listening: Callable[[Server], None] | None = None,
                on_loaded: Callable[[Server], None] | None = None) -> None:
    self._loop = asyncio.get_running_loop()
    self._stop = asyncio.Event()
    self.servicer.sink.loop = self._loop
    cfg = self.config
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=opts, interceptors=[self.auth] if self.auth else None)
    add_inference_service(self.servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
    creds = server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
    address = f"{cfg.host}:{cfg.grpc_port}"
    if self._native_module is not None:  # C++ owns the port; grpc.aio listens privately
      self._socket_dir = tempfile.mkdtemp(prefix="xlaserve-")
      backend = f"unix:{self._socket_dir}/grpc.sock"
      if server.add_insecure_port(backend) == 0:
        raise OSError(f"cannot listen on the internal socket {backend}")
      self.native = native_frontend.NativeFrontend(
          self._native_module, self.repository, backend=backend, limits=cfg.limits,
          max_message_bytes=cfg.max_message_bytes, auth_token=cfg.auth_token,
          id_prefix=self.servicer.id_prefix, threads=cfg.native_threads,
          accept_backlog=cfg.native_accept_backlog, read_coalesce=cfg.native_read_coalesce,
          tls=(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_reload_s, cfg.tls_client_ca_file)
          if creds else None, tenants=self.gate and self.gate.table)
      self.metrics.add_native_front_end(self.native.stats)
      self.servicer.canary.native_routed = self.native.routed_counts  # its split's counts
      self.servicer.trust_trace_marker = True  # grpc.aio hears only the relay: its marks hold
      if self.tracing is not None:  # C++ takes the head decision of what it would answer
        self.tracing.rate_listeners.append(self.native.set_tracing)
        self.native.set_tracing(cfg.tracing.rate)
    else:
      self.grpc_port = (server.add_secure_port(address, creds) if creds is not None
                        else server.add_insecure_port(address))
    await self._set_health(False)
    await server.start()
    if self.native is not None:
      self.grpc_port = self.native.start(address)
      if self.grpc_port:
        self.progress("gRPC front end: native (C++; other calls relayed to the Python servicer)")
    if self.grpc_port == 0:
      raise OSError(f"cannot listen on {cfg.host}:{cfg.grpc_port} (in use?); pick another"
                    " --grpc-port")
    if cfg.http_port >= 0:
      await self._start_http()
    if cfg.metrics_port >= 0:  # HTTPS with --metrics-tls
      self._metrics_server = MetricsEndpoint(cfg.host, cfg.metrics_port, self.metrics.registry,
                                             tls=tenancy.metrics_tls(cfg))
      self.metrics_port = self._metrics_server.server_address[1]
    if install_signal_handlers:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._loop.add_signal_handler(sig, self.request_stop)
    if on_listening:
      on_listening(self)
    t0 = time.perf_counter()
    if self.poller is not None:
      self.poller.prime()  # changes during the initial load are picked up by the first poll
    load = self._loop.run_in_executor(None, functools.partial(
        self.repository.load_all, self.progress, threads=self.config.model_load_threads))
    if self.startup is not None:  # what is on disk serves natively before start-up work ends
      load.add_done_callback(lambda _: self._repository_changed())
      await asyncio.gather(load, self._loop.run_in_executor(None, self._run_startup))
    await load
    self.load_s = time.perf_counter() - t0
    if self.native is not None:
      self.native.refresh()
    self.loaded.set()
    if self.poller is not None:
      self.poller.start()
    self.planner.start()
    await self._set_health(self.ready)
    self.progress(f"models loaded in {self.load_s:.1f}s; "
                  f"{'all ready' if self.ready else 'SOME UNAVAILABLE'}")
    if on_loaded:
      on_loaded(self)
    await self._stop.wait()
    await self._shutdown(server)

  async def _start_http(self) -> None:
    """The KServe v2 HTTP/REST front end over the same servicer (and so the same routing,
    validation, auth token and TLS files as gRPC): uvicorn on this loop, behind the native
    HTTP server (on a private unix socket) or on the port itself."""
    cfg = self.config
    native = self.native is not None and cfg.http_frontend != "python"  # HTTPS too (C++)
    if cfg.http_frontend == "native" and not native:
      raise RuntimeError("--http-frontend native needs the native gRPC front end (built); drop"
                         " the flag to serve HTTP from Python")
    self.http = HttpFrontend(HttpConfig(
        host=cfg.host, port=cfg.http_port, tls_cert_file=cfg.tls_cert_file,
        tls_key_file=cfg.tls_key_file, tls_client_ca_file=cfg.tls_client_ca_file,
        auth_token=cfg.auth_token, max_body_bytes=cfg.max_message_bytes,
        read_timeout_s=cfg.http_read_timeout_s, idle_timeout_s=cfg.http_idle_timeout_s),
        self.servicer, is_ready=lambda: self.ready)
    if not native:
      self.http_port = await self.http.start()
      return
    backend = f"{self._socket_dir}/http.sock"
    await self.http.start(unix_socket=backend)
    self.http.routes.trace_marker_secret = self.native.trace_secret()  # relay marks only
    self.http_port = self.native.start_http(cfg.host, cfg.http_port, backend,
                                            read_timeout_s=cfg.http_read_timeout_s,
                                            idle_timeout_s=cfg.http_idle_timeout_s,
                                            max_body_bytes=cfg.max_message_bytes)
    self.http_frontend = "native"
    self.progress("HTTP front end: native (C++; other requests relayed to the Python HTTP"
                  " server)")

  def _refused(self) -> int:
    """Requests refused (UNAVAILABLE) since shutdown began, by every front end."""
    return self.servicer.refused + (self.native.stats()["refused"] if self.native else 0)

  async def _wait_quiet(self, since: float, seen: int, end: float) -> None:
    """Waits (until `end`) for `drain_quiet_s` without a refusal (from `since`, when `seen` were
    counted). gRPC cancels, as CANCELLED, a call that reaches a server already shut down
    (grpc/grpc#41785): a client cannot tell that from any other failure."""
    while time.perf_counter() - since < self.config.drain_quiet_s and time.perf_counter() < end:
      if self._refused() != seen:
        seen, since = self._refused(), time.perf_counter()
      await asyncio.sleep(0.01)

  async def _shutdown(self, server: grpc.aio.Server) -> None:
    self.progress("shutting down: refusing new requests, answering accepted ones")
    self.servicer.accepting = False
    if self.native is not None:
      self.native.set_accepting(False)
    await self._set_health(False)
    if self.poller is not None:
      await self._loop.run_in_executor(None, self.poller.stop)
    await self._loop.run_in_executor(None, self.planner.stop)
    begin, refused = time.perf_counter(), self._refused()
    end = begin + self.config.shutdown_grace_s
    await self.servicer.wait_idle(self.config.shutdown_grace_s)
    if self.native is not None:
      await self.native.wait_idle(max(0.0, end - time.perf_counter()))
    await self._wait_quiet(begin, refused, end)
    await self._loop.run_in_executor(None, lambda: self.repository.stop(drain=True))
    if self.native is not None:
      await self._loop.run_in_executor(None, self.native.stop, 1.0)
      st = self.native.stats()
      http = (f"; HTTP: {st['http_fast']} served natively, {st['http_relayed']} relayed"
              if "http_fast" in st else "")
      self.progress(f"native front end: {st['fast']} requests served natively, {st['relayed']}"
                    f" calls relayed to the Python servicer, {st['forwarded']} handed back{http}")
    if self.http is not None:
      await self.http.stop()  # accepted requests were answered above; close the connections
    await server.stop(grace=1.0)
    if self._socket_dir is not None:
      shutil.rmtree(self._socket_dir, ignore_errors=True)
    if self._metrics_server is not None:
      self._metrics_server.shutdown()
    if self.tracing is not None:  # the spans still buffered go to the collector
      await self._loop.run_in_executor(None, self.tracing.shutdown)
    self.progress("stopped")


class BackgroundServer:
  """Runs a Server on its own thread and event loop (tests and benchmarks in one process)."""

  def __init__(self, server: Server):
    self.server = server
    self._thread = threading.Thread(target=self._main, name="xlaserve", daemon=True)
    self._listening = threading.Event()
    self.error: BaseException | None = None

  def _main(self) -> None:
    try:
      asyncio.run(self.server.run(install_signal_handlers=False,
                                  on_listening=lambda s: self._listening.set()))
    except BaseException as e:  # surfaced by start()
      self.error = e
      self._listening.set()
      self.server.loaded.set()

  def start(self, timeout: float = 300.0, *, wait_loaded: bool = True) -> BackgroundServer:
    """Starts it and waits until it listens and (`wait_loaded`) its start-up load is over."""
    self._thread.start()
    self._listening.wait(timeout)
    if wait_loaded:
      self.server.loaded.wait(timeout)
    if self.error is not None:
      raise RuntimeError(f"server failed to start: {self.error}") from self.error
    return self

  @property
  def address(self) -> str:
    return f"{self.server.config.host}:{self.server.grpc_port}"

  def stop(self, timeout: float = 60.0) -> None:
    self.server.request_stop()
    self._thread.join(timeout)
