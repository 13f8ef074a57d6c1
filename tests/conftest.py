"""Test setup: eight virtual CPU devices, so sharding tests run on one host.

The flag must be set before JAX initialises its CPU backend, hence here, first.
"""

import inspect
import os
import pathlib
import sys

# tests/serving, tests/export, ... mirror the packages; on sys.path (pytest puts tests/ there for
# the helper modules) they would shadow the real packages as namespace packages unless the
# repository itself comes first (`python -m pytest` adds it; plain `pytest` and runs from a
# subfolder do not).
_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run the tests marked slow: more variants of what the default run"
                   " already covers (CI runs without them to stay within its time budget)")


def pytest_collection_modifyitems(config, items):
  import pytest

  if config.getoption("--run-slow") or os.environ.get("XLASERVE_RUN_SLOW") == "1":
    return
  skip = pytest.mark.skip(reason="slow variant: run with --run-slow (or XLASERVE_RUN_SLOW=1)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


def pytest_configure(config):
  _own_subchannels_per_channel()


def _own_subchannels_per_channel() -> None:
  """Every gRPC channel the tests open (tritonclient's included) gets its own connections.

  By default gRPC shares connections between channels to the same address. A test that keeps a
  client to a server it stopped leaves that shared connection failed and backing off; when the
  OS later hands the same free port to another test's server, new clients to it would fail at
  once with UNAVAILABLE until the back-off ends (seen as a rare full-suite failure). Production
  clients meet a restarted server the same way; tests must not meet each other's."""
  import grpc

  option = ("grpc.use_local_subchannel_pool", 1)

  def own(make):
    signature = inspect.signature(make)

    def channel(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.arguments["options"] = [*(bound.arguments.get("options") or ()), option]
      return make(*bound.args, **bound.kwargs)
    channel.own_subchannels = True
    return channel

  for name in ("insecure_channel", "secure_channel"):
    if not getattr(getattr(grpc, name), "own_subchannels", False):
      setattr(grpc, name, own(getattr(grpc, name)))
