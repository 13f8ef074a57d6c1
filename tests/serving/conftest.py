"""Fixtures: a real xlaserve gRPC server on 127.0.0.1 (free port) serving the exact MockEngine."""

import contextlib

import pytest

from servingutil import serving, write_mock_bundle
from serving.engines.mock import MockEngine


@pytest.fixture
def mock_repo(tmp_path):
  """A repository holding one MockEngine bundle, mock v1."""
  write_mock_bundle(tmp_path / "repo", "mock", 1)
  return tmp_path / "repo"


@pytest.fixture
def start_mock_server(tmp_path):
  """start(**mock_kwargs) -> (BackgroundServer, {name: MockEngine}); stopped after the test."""
  with contextlib.ExitStack() as servers:

    def start(models=("mock",), config=None, server_kwargs=None, **engine_kwargs):
      repo = tmp_path / "repo"
      engines = {}
      for name in models:
        write_mock_bundle(repo, name, config=config)

      def factory(path, manifest, cfg):
        eng = MockEngine(buckets=manifest.batch_buckets, **engine_kwargs)
        engines[manifest.name] = eng
        return eng

      return servers.enter_context(serving(repo, factory, **(server_kwargs or {}))), engines

    yield start
