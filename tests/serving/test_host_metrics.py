"""Host metrics under Triton's names: utilization between two scrapes worked by hand from a
/proc/stat pair, and on the real server's /metrics, memory equal to what sysconf reports."""

from __future__ import annotations

import os
import urllib.request

import prometheus_client as prom
import pytest

from serving.telemetry.host_metrics import HostCollector
from servingutil import metric, mock_factory, serving, write_mock_bundle

MEMINFO = "MemTotal:       16000 kB\nMemFree:         1000 kB\nMemAvailable:    6000 kB\n"


def _scrape(collector: HostCollector) -> str:
  registry = prom.CollectorRegistry()
  registry.register(collector)
  return prom.generate_latest(registry).decode()


def test_utilization_is_the_busy_share_of_the_ticks_between_scrapes(tmp_path):
  # user nice system idle iowait irq softirq steal
  (tmp_path / "stat").write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
  (tmp_path / "meminfo").write_text(MEMINFO)
  collector = HostCollector(tmp_path)
  (tmp_path / "stat").write_text("cpu  350 0 150 850 150 0 0 0 0 0\n")
  text = _scrape(collector)
  # busy +300 (user 250, system 50) of +500 ticks (idle 150, iowait 50 not busy)
  assert metric(text, "nv_cpu_utilization") == pytest.approx(0.6)
  assert metric(text, "nv_cpu_memory_total_bytes") == 16000 * 1024
  assert metric(text, "nv_cpu_memory_used_bytes") == 10000 * 1024
  assert metric(_scrape(collector), "nv_cpu_utilization") == 0.0  # no ticks since: idle


def test_a_host_without_proc_reports_nothing_rather_than_zeros(tmp_path):
  text = _scrape(HostCollector(tmp_path / "missing"))
  assert "nv_cpu" not in text


def test_the_server_reports_the_hosts_memory_and_no_gpu_series(tmp_path):
  write_mock_bundle(tmp_path / "repo")
  with serving(tmp_path / "repo", mock_factory(), metrics_port=0) as bg:
    url = f"http://127.0.0.1:{bg.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # glibc: sysinfo totalram
  assert metric(text, "nv_cpu_memory_total_bytes") == total
  assert 0 < metric(text, "nv_cpu_memory_used_bytes") < total
  assert 0.0 <= metric(text, "nv_cpu_utilization") <= 1.0
  assert "nv_gpu_" not in text  # no NVML here: absent, not zero
