"""The process-wide settings of one xlaserve server (per-model settings live in each model's
config.json): ports, limits, TLS and token, front ends, shutdown."""

from __future__ import annotations

import dataclasses

from serving.frontend import codec
from serving.frontend.auth import check_token
from serving.frontend.tenants import Tenant
from serving.repository import ModelServingConfig
from serving.telemetry.tracing import TracingConfig


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
  """Process-wide settings; per-model settings live in each model's config.json."""

  model_repository: str
  host: str = "127.0.0.1"
  grpc_port: int = 8001
  metrics_port: int = 8002  # 0: any free port; -1: no metrics endpoint
  http_port: int = -1  # KServe v2 HTTP/REST (the CLI's --http-port: 8000); 0: any; -1: none
  http_read_timeout_s: float = 30.0  # an HTTP request must arrive whole within this (else 408)
  http_idle_timeout_s: float = 60.0  # a keep-alive HTTP connection idle this long closes
  max_message_bytes: int = 64 << 20
  limits: codec.Limits = codec.Limits()
  shutdown_grace_s: float = 30.0
  drain_quiet_s: float = 0.0  # the ports close after this long without a request (the CLI: 0.5)
  default_model_config: ModelServingConfig = ModelServingConfig()
  repository_poll_s: float = 0.0  # > 0: poll the repository for new/removed versions (hot reload)
  tls_cert_file: str | None = None  # PEM certificate chain; with tls_key_file: serve gRPC over TLS
  tls_key_file: str | None = None
  tls_reload_s: float = 60.0  # the native front end re-reads the TLS files this often
  auth_token: str | None = dataclasses.field(default=None, repr=False)  # bearer token, or None
  frontend: str = "auto"  # "native" (C++), "python" (grpc.aio), "auto": native when built
  # HTTP: "native" (C++ owns the port, serves binary-tensor inference of natively queued models
  # and relays the rest to uvicorn), "python" (uvicorn owns the port), "auto": native when the
  # gRPC front end is native (no TLS)
  http_frontend: str = "auto"
  native_threads: int = 1  # completion-queue threads of the native front end
  # ModelInfer calls the native front end accepts before their message is read; more wait
  # inside gRPC, unaccepted (a bounded backlog keeps each call's cost flat under overload)
  native_accept_backlog: int = 1024
  # With a model latency target, the native gRPC worker pauses under load so arrivals are
  # read together (serving/frontend/native/cq_poll.cc); opt-in
  native_read_coalesce: bool = False
  batch_queue: str = "native"  # plain batched models: "native" (C++ queue, with the native
  # front end) or "python" (the Python Batcher; for comparison)
  model_load_threads: int = 4  # models loaded at once at start-up (Triton's default: 4)
  profile_dir: str | None = None  # profile captures' traces; None: under the temp dir
  # Bytes per device all loaded versions may hold together (params, executables, scratch); a
  # load beyond it is refused with RESOURCE_EXHAUSTED (serving/repository/budget.py). None: no cap.
  device_memory_budget_bytes: int | None = None
  tracing: TracingConfig = TracingConfig()  # OpenTelemetry: sampling rate and OTLP endpoint
  # A PEM CA bundle: mutual TLS, clients must present a certificate it signed (re-read as the
  # certificate is, by the native front end)
  tls_client_ca_file: str | None = None
  # Tenants and quotas (--tenants FILE, serving/frontend/tenants.py): every call needs a tenant
  tenants: tuple[Tenant, ...] = dataclasses.field(default=(), repr=False)
  metrics_tls: bool = False  # serve the metrics port over HTTPS with the TLS files above

  def __post_init__(self):
    if not 0 <= self.grpc_port < 65536 or not -1 <= self.metrics_port < 65536:
      raise ValueError("ports must be in 0..65535 (metrics_port -1 disables metrics)")
    if not -1 <= self.http_port < 65536:
      raise ValueError(f"http_port must be in 0..65535 (-1 disables HTTP), got {self.http_port}")
    if self.max_message_bytes < 1024:
      raise ValueError(f"max_message_bytes={self.max_message_bytes} is too small")
    if self.repository_poll_s < 0:
      raise ValueError(f"repository_poll_s must be >= 0 (0 disables), got {self.repository_poll_s}")
    if (self.tls_cert_file is None) != (self.tls_key_file is None):
      raise ValueError("TLS needs both a certificate and a key file (--tls-cert and --tls-key)")
    if self.auth_token is not None:
      check_token(self.auth_token)
    if self.tls_client_ca_file is not None and self.tls_cert_file is None:
      raise ValueError("mutual TLS (--tls-client-ca) needs TLS: --tls-cert and --tls-key")
    if self.metrics_tls and self.tls_cert_file is None:
      raise ValueError("--metrics-tls needs TLS: --tls-cert and --tls-key")
    if self.tenants and self.auth_token is not None:
      raise ValueError("--tenants and --auth-token-file both say who may call: use one (give the"
                       " token to a tenant)")
    if self.frontend not in ("auto", "native", "python"):
      raise ValueError(f"frontend must be auto, native or python, got {self.frontend!r}")
    if self.http_frontend not in ("auto", "native", "python"):
      raise ValueError(f"http_frontend must be auto, native or python, got {self.http_frontend!r}")
    if self.batch_queue not in ("native", "python"):
      raise ValueError(f"batch_queue must be native or python, got {self.batch_queue!r}")
    if self.device_memory_budget_bytes is not None and self.device_memory_budget_bytes <= 0:
      raise ValueError(f"device_memory_budget_bytes must be > 0, got"
                       f" {self.device_memory_budget_bytes}")
    for name, low in (("http_idle_timeout_s", 0), ("tls_reload_s", 1), ("native_threads", 1),
                      ("native_accept_backlog", 1), ("model_load_threads", 1), ("shutdown_grace_s", 0), ("drain_quiet_s", 0)):
      if getattr(self, name) < low:
        raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
