"""Helpers for the HTTP/REST front end tests: raw HTTP calls (http.client, independent of
tritonclient), a server with both protocols on free ports, and a generative model served through
the exact mock generation engine (next token = last token + 1, so completions are worked by hand).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import pathlib
from typing import Any, Iterator

from bundle import Manifest, Signature, write_bundle
from serving.generation.mock_engine import MockEngine as MockGenerateEngine
from serving.generation.runner import TEXT_INPUT, TEXT_OUTPUT, GenerationRunner
from serving.generation.service import GenerationService
from serving.kinds import ModelKind, standard_kinds
from serving.server import BackgroundServer, Server, ServerConfig
from servingutil import mock_factory, write_mock_bundle


class Http:
  """Raw HTTP/1.1 calls to one server (a fresh connection per call)."""

  def __init__(self, port: int, *, headers: dict[str, str] | None = None):
    self.port = port
    self.headers = headers or {}

  def call(self, method: str, path: str, body: bytes | None = None,
           headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
    try:
      conn.request(method, path, body=body, headers={**self.headers, **(headers or {})})
      resp = conn.getresponse()
      return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
      conn.close()

  def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return self.call("GET", path, **kw)

  def post_json(self, path: str, obj: Any, **kw: Any) -> tuple[int, Any]:
    """(status, decoded JSON body or None when empty)."""
    status, _, body = self.call("POST", path, json.dumps(obj).encode(), **kw)
    return status, json.loads(body) if body else None


def generate_kinds(**engine_kwargs: Any) -> dict[str, ModelKind]:
  """The standard kinds with predict models on the exact MockEngine and generate models on the
  exact mock generation engine."""
  kinds = standard_kinds(mock_factory(**engine_kwargs))
  kinds["generate"] = ModelKind(lambda spec: GenerationRunner(
      spec.name, GenerationService(MockGenerateEngine())))
  return kinds


def write_generate_bundle(repo: pathlib.Path, name: str = "lm") -> None:
  """A generate bundle (text_input BYTES -> text_output BYTES) with no params."""
  manifest = Manifest(name=name, version=1, kind="generate", jax_version="0.10.2",
                      signatures={"serve": Signature("serve", (TEXT_INPUT,), (TEXT_OUTPUT,), {})},
                      params=(), batch_buckets=(1,))
  write_bundle(repo / name / "1", manifest, [], {})


def mock_completion(prompt: bytes, n: int) -> bytes:
  """What the mock generation engine continues `prompt` with: n bytes, each one more than the
  last (mod 256)."""
  out, last = bytearray(), prompt[-1]
  for _ in range(n):
    last = (last + 1) % 256
    out.append(last)
  return bytes(out)


@contextlib.contextmanager
def both_protocols(repo: pathlib.Path, *, generate: bool = False, config: dict | None = None,
                   engine_kwargs: dict | None = None,
                   **server_config: Any) -> Iterator[BackgroundServer]:
  """A server over a repository holding `mock` (and `lm` with `generate`) with gRPC and HTTP on
  free ports of 127.0.0.1; `config` is mock's config.json."""
  write_mock_bundle(repo, "mock", 1, config=config)
  if generate:
    write_generate_bundle(repo)
  server_config.setdefault("metrics_port", -1)
  bg = BackgroundServer(Server(ServerConfig(model_repository=str(repo), grpc_port=0, http_port=0,
                                            **server_config),
                               kinds=generate_kinds(**(engine_kwargs or {})))).start()
  try:
    yield bg
  finally:
    bg.stop()


def raw_request(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
  """One HTTP/1.1 request as bytes (a Content-Length of `body` unless headers give None)."""
  headers = {"Host": "x", "Content-Length": str(len(body)), **(headers or {})}
  return (f"{method} {path} HTTP/1.1\r\n" + "".join(
      f"{k}: {v}\r\n" for k, v in headers.items() if v is not None) + "\r\n").encode() + body


def read_reply(fp) -> tuple[int, dict[str, str], bytes]:
  """One response from a buffered socket file; both front ends send Content-Length bodies."""
  line = fp.readline()
  assert line.startswith(b"HTTP/1.1 "), line
  headers = {k.lower(): v for k, v in http.client.parse_headers(fp).items()}
  status = int(line.split()[1])
  assert status == 100 or "content-length" in headers, headers
  return status, headers, fp.read(int(headers.get("content-length", 0)))
