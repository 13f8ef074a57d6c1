"""Fixtures: a real xlaserve gRPC server on 127.0.0.1 (free port) serving the exact MockEngine."""

import pytest

from servingutil import write_mock_bundle  # noqa: F401  (re-exported for older imports)
from serving.engines.mock import MockEngine
from serving.server import BackgroundServer, Server, ServerConfig


@pytest.fixture
def start_mock_server(tmp_path):
  """start(**mock_kwargs) -> (BackgroundServer, {name: MockEngine}); stopped after the test."""
  servers = []

  def start(models=("mock",), config=None, server_kwargs=None, **engine_kwargs):
    repo = tmp_path / "repo"
    engines = {}
    for name in models:
      write_mock_bundle(repo, name, config=config)

    def factory(path, manifest, cfg):
      eng = MockEngine(buckets=manifest.batch_buckets, **engine_kwargs)
      engines[manifest.name] = eng
      return eng

    server = Server(ServerConfig(model_repository=str(repo), grpc_port=0, metrics_port=-1,
                                 **(server_kwargs or {})), engine_factory=factory)
    bg = BackgroundServer(server).start()
    servers.append(bg)
    return bg, engines

  yield start
  for bg in servers:
    bg.stop()
