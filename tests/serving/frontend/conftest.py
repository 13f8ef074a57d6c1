"""Fixtures shared by the front end tests."""

from __future__ import annotations

import pytest

from certutil import write_cert


@pytest.fixture(scope="module")
def cert_files(tmp_path_factory):
  """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
  return write_cert(tmp_path_factory.mktemp("tls"))
