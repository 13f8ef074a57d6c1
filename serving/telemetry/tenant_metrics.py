"""Prometheus series of tenants (`--tenants`), read from the tenant table at scrape time.

  xlaserve_tenant_requests_total{tenant,outcome}   inference requests charged to a tenant:
    outcome "admitted", or "over_quota" (refused RESOURCE_EXHAUSTED / HTTP 429)
  xlaserve_tenant_unknown_total                    calls refused for want of a tenant (C++ and Python)
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client.core import Metric


class TenantCollector:
  """Renders `stats()` (tenant -> (admitted, over quota)) and `unknown()` at each scrape."""

  def __init__(self, stats: Callable[[], Mapping[str, tuple[int, int]]],
               unknown: Callable[[], int]):
    self._stats = stats
    self._unknown = unknown

  def collect(self) -> Iterator[Metric]:
    m = Metric("xlaserve_tenant_requests", "Inference requests charged to each tenant, by"
               " outcome (admitted, over_quota)", "counter")
    for name, (admitted, over) in sorted(self._stats().items()):
      m.add_sample("xlaserve_tenant_requests_total", {"tenant": name, "outcome": "admitted"},
                   float(admitted))
      m.add_sample("xlaserve_tenant_requests_total", {"tenant": name, "outcome": "over_quota"},
                   float(over))
    yield m
    u = Metric("xlaserve_tenant_unknown", "Calls refused UNAUTHENTICATED: no tenant has their"
               " credentials", "counter")
    u.add_sample("xlaserve_tenant_unknown_total", {}, float(self._unknown()))
    yield u
