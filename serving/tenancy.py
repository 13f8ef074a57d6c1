"""Wires `--tenants` into a server: the tenant table (the C++ one when the native front end
serves, so every path charges the same buckets), the gate the Python front ends identify callers
with, and the per-tenant metrics; and who may call at all (`interceptor`), and the metrics
port's TLS. Kept out of serving/server.py, which only calls these."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry

from serving.frontend.auth import BearerTokenInterceptor
from serving.frontend.servicer import InferenceServicer
from serving.frontend.tenant_gate import TenantGate, TenantInterceptor
from serving.frontend.tenants import TenantTable
from serving.server_config import ServerConfig
from serving.telemetry.tenant_metrics import TenantCollector


def install(config: ServerConfig, native_module: Any, servicer: InferenceServicer,
            registry: CollectorRegistry) -> TenantGate | None:
  """The gate over the configured tenants (None without `--tenants`), given to `servicer` (its
  requests are charged once their rows are known); its counts are exported to `registry`."""
  if not config.tenants:
    return None
  if native_module is not None:  # behind the native front end: its table and its marks
    table = native_module.Tenants([t.native() for t in config.tenants])
  else:
    table = TenantTable(config.tenants)
  gate = TenantGate(table, trust_marker=native_module is not None)
  servicer.tenant_gate = gate
  native_unknown = getattr(table, "unknown", lambda: 0)  # the C++ table refuses ModelInfers too
  registry.register(TenantCollector(table.stats, lambda: gate.unknown + native_unknown()))
  return gate


def interceptor(config: ServerConfig, gate: TenantGate | None, native: Callable[[], Any]
                ) -> BearerTokenInterceptor | TenantInterceptor | None:
  """The grpc.aio interceptor that checks who calls: the bearer token's, the tenants' (which
  decides each call's tenant), or None when anyone may; `native()`: the native front end, once
  started (its refusals count in the token interceptor's `denied`)."""
  if config.auth_token:
    return BearerTokenInterceptor(config.auth_token, native=native)
  return TenantInterceptor(gate) if gate is not None else None


def metrics_tls(config: ServerConfig) -> tuple[str, str, str | None, float] | None:
  """The metrics port's TLS with `--metrics-tls`: the server's certificate files, its client CA
  (scrapers then need a client certificate) and how often to check them; else None: plain HTTP."""
  if not config.metrics_tls:
    return None
  return (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
          config.tls_reload_s)
